"""Where the shards are: a manifest, a directory or a brace pattern -> a checked list of tar files.

Shard format (written by `simscale prepare`): `shard-%06d.tar` holding, per sample `KEY`,
`KEY.jpg` (or the source's own JPEG bytes), optional `KEY.cls` (ASCII integer label) and
`KEY.json` (original size, source path). `manifest.json` beside them:

    {"format": "simscale-shards/1", "total": N, "classes": [...] | null,
     "shards": [{"name": "shard-000000.tar", "samples": n, "bytes": b, "sha256": "..."}, ...]}

Sample counts come from the manifest (never from reading every tar at start-up), so exact-epoch
splitting and resume positions can be computed before any data is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from simscale.errors import DataError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "simscale-shards/1"


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]  # tar paths in manifest (or sorted) order
    counts: list[int] | None  # samples per shard, when a manifest gives them
    classes: list[str] | None = None

    @property
    def total(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def read_manifest(path: str | Path) -> ShardSet:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"manifest '{path}' not found: run `simscale prepare ... --out {path.parent}`") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"manifest '{path}' is not valid JSON: re-run `simscale prepare` to rewrite it") from None
    if not isinstance(data, dict) or "shards" not in data:
        raise DataError(f"manifest '{path}' has no 'shards' list: is it a simscale manifest?")
    urls, counts = [], []
    entries = data["shards"] if isinstance(data["shards"], list) else [None]
    for entry in entries:
        try:
            name, samples = entry["name"], entry["samples"]
            assert isinstance(name, str) and "/" not in name and "\\" not in name and name not in ("", ".", "..")
            assert isinstance(samples, int) and samples >= 0
        except (TypeError, KeyError, AssertionError):
            raise DataError(f"manifest '{path}' has a malformed shard entry ({str(entry)[:80]}): re-run "
                            "`simscale prepare` to rewrite it") from None
        url = path.parent / name
        if not url.is_file():
            raise DataError(f"shard '{url}' listed in '{path}' is missing: re-run `simscale prepare` "
                            "(it resumes) or restore the file")
        urls.append(str(url))
        counts.append(int(entry["samples"]))
    if not urls:
        raise DataError(f"manifest '{path}' lists no shards: the source held no readable images")
    return ShardSet(urls, counts, data.get("classes"))


def write_manifest(out_dir: str | Path, shards: list[dict], classes: list[str] | None, **extra) -> Path:
    """Write manifest.json atomically (temp name, then rename) so a reader never sees half of it."""
    out_dir = Path(out_dir)
    data = {"format": MANIFEST_FORMAT, "total": sum(int(s["samples"]) for s in shards),
            "classes": classes, "shards": shards, **extra}
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out_dir / MANIFEST)
    return out_dir / MANIFEST


def resolve_shards(spec: str) -> ShardSet:
    """`DIR/manifest.json`, `DIR` (its manifest if present, else its *.tar) or `a/shard-{0..9}.tar`."""
    if not spec:
        raise DataError("no shards given: set data.train=DIR (a `simscale prepare` output) or a manifest")
    path = Path(spec)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return read_manifest(path / MANIFEST)
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise DataError(f"directory '{spec}' holds no manifest.json and no .tar shards: "
                            "run `simscale prepare SRC --out DIR` first")
        return ShardSet(urls, None)
    if path.suffix == ".json":
        return read_manifest(path)
    urls = list(braceexpand.braceexpand(spec))
    if len(urls) == 1 and not path.exists():
        raise DataError(f"shards '{spec}' not found: pass a `simscale prepare` output directory, its "
                        "manifest.json, or a brace pattern like dir/shard-{000000..000009}.tar")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise DataError(f"shard '{missing[0]}' not found ({len(missing)} of {len(urls)} missing): "
                        "check the path or pattern")
    return ShardSet(urls, None)
