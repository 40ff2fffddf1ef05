"""`simscale prepare --out URL`: shards are written to a local stage folder, then uploaded.

- Each shard becomes visible only when complete: on S3/GCS an object appears when its upload
  (single PUT or multipart) completes; other stores get a temp name, then a move (remote.py).
- The remote manifest.json is deleted first and uploaded last: its presence means "complete",
  as for a local `simscale prepare` output.
- Resume: the stage folder (stable per URL unless --stage is given) keeps `prepare`'s own
  resume state plus `.upload-state.json`, the shards already uploaded with their sha256; a
  re-run skips a shard whose recorded sha256 matches and whose remote size is right.
- The stage is removed after a complete upload. It needs room for the whole output.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from simscale.data import remote
from simscale.data.shards import MANIFEST, REPORT

STATE = ".upload-state.json"


def default_stage(url: str) -> Path:
    return Path(tempfile.gettempdir()) / f"simscale-stage-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def upload(stage: str | Path, url: str, progress=None) -> dict:
    """Upload a prepared local folder to `url`; returns {"uploaded", "skipped"} shard counts."""
    stage, url = Path(stage), url.rstrip("/")
    manifest = json.loads((stage / MANIFEST).read_text())
    state_path = stage / STATE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("url") != url:
        state = {"url": url, "done": {}}
    remote.remove(remote.join(url, MANIFEST))  # readers see "incomplete" until the end
    uploaded = skipped = 0
    for s in manifest["shards"]:
        dest = remote.join(url, s["name"])
        if state["done"].get(s["name"]) == s["sha256"] and remote.size(dest) == s["bytes"]:
            skipped += 1
            continue
        remote.put_file(stage / s["name"], dest)
        state["done"][s["name"]] = s["sha256"]
        _save(state_path, state)
        uploaded += 1
        if progress:
            progress(uploaded + skipped, len(manifest["shards"]))
    if (stage / REPORT).is_file():
        remote.put_file(stage / REPORT, remote.join(url, REPORT))
    remote.put_file(stage / MANIFEST, remote.join(url, MANIFEST))
    return {"uploaded": uploaded, "skipped": skipped}


def remove_stage(stage: str | Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
