"""Where the shards are: a manifest, a directory or a brace pattern -> a checked list of tar files.

Shard format (written by `simscale prepare`): `shard-%06d.tar` holding, per sample `KEY`,
`KEY.jpg` (or the source's own JPEG bytes), optional `KEY.cls` (ASCII integer label) and
`KEY.json` (original size, source path). `manifest.json` beside them:

    {"format": "simscale-shards/1", "total": N, "classes": [...] | null,
     "shards": [{"name": "shard-000000.tar", "samples": n, "bytes": b, "sha256": "..."}, ...]}

`spec` may also be a URL (http(s)://, s3://, gs://; see remote.py) of a prepared directory,
its manifest.json or a brace pattern of tars. A manifest's shard names are relative to it, or
full URLs/absolute paths (a manifest written with `simscale prepare --index --manifest-out`).

Sample counts come from the manifest (never from reading every tar at start-up), so exact-epoch
splitting and resume positions can be computed before any data is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from simscale.data import remote
from simscale.errors import DataError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "simscale-shards/1"
REPORT = "skipped.tsv"  # prepare's list of skipped sources, uploaded beside the manifest


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]  # tar paths in manifest (or sorted) order
    counts: list[int] | None  # samples per shard, when a manifest gives them
    classes: list[str] | None = None
    sizes: list[int | None] | None = None  # bytes per shard, when the manifest gives them
    sha256: list[str | None] | None = None

    @property
    def total(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def read_manifest(path: str | Path, opts: remote.IOOptions | None = None) -> ShardSet:
    if remote.is_url(path):
        return _read_remote_manifest(str(path), opts)
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
        name, samples = _entry(entry, path)
        if remote.is_url(name):  # a local manifest of remote tars (prepare --index --manifest-out)
            urls.append(name)
            counts.append(samples)
            continue
        url = path.parent / name
        if not url.is_file():
            raise DataError(f"shard '{url}' listed in '{path}' is missing: re-run `simscale prepare` "
                            "(it resumes) or restore the file")
        urls.append(str(url))
        counts.append(samples)
    if not urls:
        raise DataError(f"manifest '{path}' lists no shards: the source held no readable images")
    return ShardSet(urls, counts, data.get("classes"), *_checks(data))


def _entry(entry, where) -> tuple[str, int]:
    """(name, samples) of one manifest entry, refusing names that would leave the shard directory
    (a plain file name, or a full URL as `prepare --index --manifest-out` writes)."""
    try:
        name, samples = entry["name"], entry["samples"]
        assert isinstance(name, str) and isinstance(samples, int) and samples >= 0
        assert remote.is_url(name) or ("/" not in name and "\\" not in name and name not in ("", ".", ".."))
    except (TypeError, KeyError, AssertionError):
        raise DataError(f"manifest '{where}' has a malformed shard entry ({str(entry)[:80]}): re-run "
                        "`simscale prepare` to rewrite it") from None
    return name, samples


def _checks(data: dict) -> tuple[list, list]:
    return ([e.get("bytes") for e in data["shards"]], [e.get("sha256") for e in data["shards"]])


def _read_remote_manifest(url: str, opts: remote.IOOptions | None) -> ShardSet:
    # Shards are not probed one by one (10k HEAD requests at start-up); a missing one is a
    # one-line DataError when it is opened.
    try:
        data = json.loads(remote.read_bytes(url, opts))
    except DataError as exc:
        if "not found" in str(exc):
            raise DataError(f"manifest '{url}' not found: run `simscale prepare ... --out "
                            f"{url.rsplit('/', 1)[0]}`, or `simscale prepare --index` for existing "
                            "WebDataset tars") from None
        raise
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"manifest '{url}' is not valid JSON: re-run `simscale prepare` to rewrite it") from None
    if not isinstance(data, dict) or not data.get("shards"):
        raise DataError(f"manifest '{url}' has no 'shards' list: is it a simscale manifest?")
    base = url.rsplit("/", 1)[0]
    entries = [_entry(e, url) for e in (data["shards"] if isinstance(data["shards"], list) else [None])]
    urls = [remote.join(base, name) for name, _ in entries]
    counts = [samples for _, samples in entries]
    return ShardSet(urls, counts, data.get("classes"), *_checks(data))


def _resolve_url(spec: str, opts: remote.IOOptions | None) -> ShardSet:
    if spec.endswith(".json"):
        return read_manifest(spec, opts)
    if "{" in spec or spec.endswith(".tar"):
        return ShardSet(list(braceexpand.braceexpand(spec)), None)
    base = spec.rstrip("/")
    try:
        return read_manifest(f"{base}/{MANIFEST}", opts)
    except DataError as exc:
        if "not found" not in str(exc):
            raise
    try:
        urls = remote.list_tars(base, opts)
    except DataError:
        urls = []
    if not urls:
        raise DataError(f"'{spec}' holds no manifest.json and no listable .tar shards: run "
                        f"`simscale prepare --index {spec}` (or give a brace pattern of tars)")
    return ShardSet(urls, None)


def write_manifest(out_dir: str | Path, shards: list[dict], classes: list[str] | None, **extra) -> Path:
    """Write manifest.json atomically (temp name, then rename) so a reader never sees half of it."""
    out_dir = Path(out_dir)
    data = {"format": MANIFEST_FORMAT, "total": sum(int(s["samples"]) for s in shards),
            "classes": classes, "shards": shards, **extra}
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out_dir / MANIFEST)
    return out_dir / MANIFEST


def resolve_shards(spec: str, opts: remote.IOOptions | None = None) -> ShardSet:
    """`DIR/manifest.json`, `DIR` (its manifest if present, else its *.tar) or `a/shard-{0..9}.tar`;
    `opts`: the I/O options a remote manifest or listing is read with."""
    if not spec:
        raise DataError("no shards given: set data.train=DIR (a `simscale prepare` output) or a manifest")
    if remote.is_url(spec):
        return _resolve_url(spec, opts)
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
