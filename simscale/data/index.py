"""`simscale prepare --index DIR_OR_URL`: a manifest.json for existing WebDataset tars.

Tars written by other tools (img2dataset: `KEY.jpg` + `KEY.json` + `KEY.txt`, sometimes
`KEY.cls`) are read once, streamed, never rewritten: per tar the sample count (what the
stream's tar reader will yield, so exact-epoch mode can split it), bytes and sha256. A sample
must hold an image (jpg/jpeg/png/webp) or the tar is refused, naming the sample; `.cls`
integer labels, when every sample has one, become the manifest's classes ("0".."max").

The manifest is written beside the tars, or at --manifest-out (for a read-only location);
then its shard names are full URLs/paths.
"""
from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_iterator

from simscale.data import remote
from simscale.data.opener import open_shard
from simscale.data.shards import MANIFEST, MANIFEST_FORMAT
from simscale.errors import DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class _Hashing(io.RawIOBase):
    """Counts and hashes every byte read through it."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.f.read(len(buffer))
        self.sha.update(data)
        self.n += len(data)
        buffer[:len(data)] = data
        return len(data)


def _list(location: str, opts: remote.IOOptions) -> list[str]:
    if "{" in location:
        return list(braceexpand.braceexpand(location))
    if remote.is_url(location):
        if location.endswith(".tar"):
            return [location]
        return remote.list_tars(location, opts)
    path = Path(location)
    if path.is_file() and path.suffix == ".tar":
        return [str(path)]
    if not path.is_dir():
        raise DataError(f"--index '{location}' is not a directory, a .tar or a URL: pass the folder "
                        "(or bucket prefix) holding the WebDataset tars")
    return sorted(str(p) for p in path.glob("*.tar") if not p.name.startswith("."))


def index_tar(url: str, opts: remote.IOOptions | None = None) -> dict:
    """{"name", "samples", "bytes", "sha256", "labels"} of one tar, read once."""
    labels, n = [], 0
    with open_shard(url, opts) as raw:
        f = _Hashing(raw)
        try:
            members = (dict(m, __url__=url) for m in tar_file_iterator(io.BufferedReader(f)))
            # group_by_keys is the grouping the stream uses: counts match what it will yield.
            for sample in group_by_keys(members):
                if not any(k in sample for k in IMAGE_KEYS):
                    raise DataError(f"sample '{sample.get('__key__')}' in '{url}' has no image "
                                    f"({'/'.join(IMAGE_KEYS)}): fix the tar or re-run `simscale "
                                    "prepare` on the images")
                cls = sample.get("cls")
                labels.append(int(cls) if cls is not None and cls.strip().lstrip(b"-").isdigit() else None)
                n += 1
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken tar, named in one line
            raise DataError(f"'{url}' is not a readable tar ({type(exc).__name__}: {exc}): "
                            "re-download it or leave it out") from None
        while f.read(1 << 20):  # the rest (tar end blocks): the hash covers the whole file
            pass
    if n == 0:
        raise DataError(f"'{url}' holds no samples: leave it out of --index")
    return {"name": url, "samples": n, "bytes": f.n, "sha256": f.sha.hexdigest(), "labels": labels}


def index(location: str, manifest_out: str | None = None, workers: int = 8,
          opts: remote.IOOptions | None = None) -> dict:
    """Write the manifest for the tars at `location`; returns {"manifest", "shards", "samples"}."""
    opts = opts or remote.IOOptions()
    urls = _list(location, opts)
    if not urls:
        raise DataError(f"no .tar files at '{location}': pass the folder or prefix holding them "
                        "(an HTTP location needs an index page, or give a brace pattern)")
    with ThreadPoolExecutor(max(1, min(workers, len(urls)))) as pool:  # I/O bound: threads
        entries = list(pool.map(lambda u: index_tar(u, opts), urls))
    beside = manifest_out is None
    if beside and "{" in location:
        raise DataError("--index with a brace pattern needs --manifest-out PATH (there is no single "
                        "folder to write manifest.json into)")
    base = None
    if beside:  # names relative to the manifest's folder
        base = location.rstrip("/")
        if base.endswith(".tar"):
            base = base.rsplit("/", 1)[0] if remote.is_url(base) else str(Path(base).parent)
    shards, labels = [], []
    for e in entries:
        labels += e.pop("labels")
        name = e["name"].rstrip("/").rsplit("/", 1)[-1] if base is not None else e["name"]
        if base is None and not remote.is_url(name):
            name = str(Path(name).resolve())
        shards.append(dict(e, name=name))
    classes = None
    if labels and all(x is not None and x >= 0 for x in labels):
        classes = [str(i) for i in range(max(labels) + 1)]
    target = manifest_out or remote.join(base, MANIFEST)
    data = {"format": MANIFEST_FORMAT, "total": sum(s["samples"] for s in shards),
            "classes": classes, "shards": shards, "indexed_from": location}
    if remote.is_url(target):
        remote.put_bytes(json.dumps(data, indent=1).encode(), target, opts)
    else:
        out = Path(target)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(out)  # a reader never sees half a manifest
        except OSError as exc:
            raise DataError(f"cannot write '{out}' ({exc.strerror}): the tars' folder may be read-only, "
                            "pass --manifest-out PATH") from None
    return {"manifest": target, "shards": len(shards), "samples": data["total"]}
