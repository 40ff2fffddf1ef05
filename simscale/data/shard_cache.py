"""A size-bounded local cache of remote shards (data.cache_dir, data.cache_gb).

A shard is downloaded (through remote.py's retrying reader) to a temp name in the cache and
renamed when complete, so a reader never opens half a file and workers that race on the same
shard each write their own temp file and the last rename wins (same bytes). Size and sha256
are checked against the manifest when it gives them (on download; a hit checks the size); a mismatch is downloaded once more, then
is a DataError. A hit refreshes the file's mtime; past the bound the least recently used
shards are evicted (never the one being opened).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from simscale.data import remote
from simscale.errors import DataError


def cache_path(cache_dir: str | Path, url: str) -> Path:
    # Readable tail + hash of the whole URL: two buckets with the same shard names never collide.
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{digest}-{url.rstrip('/').rsplit('/', 1)[-1]}"


def _download(url: str, dest: Path, opts: remote.IOOptions) -> tuple[int, str]:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    h, n = hashlib.sha256(), 0
    try:
        with remote.open_url(url, opts) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
                out.write(chunk)
        tmp.replace(dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write '{dest}' in data.cache_dir ({exc.strerror}): free space, "
                        "lower data.cache_gb or unset data.cache_dir") from None
    finally:
        tmp.unlink(missing_ok=True)
    return n, h.hexdigest()


def evict(cache_dir: str | Path, bound: int, keep: Path | None = None) -> None:
    """Remove least recently used cached shards until the cache holds at most `bound` bytes."""
    if bound <= 0:
        return
    files = []
    for p in Path(cache_dir).iterdir():
        if p.name.startswith(".") or not p.is_file():
            continue
        try:
            st = p.stat()
        except FileNotFoundError:  # another worker evicted it
            continue
        files.append((st.st_mtime, st.st_size, p))
    total = sum(s for _, s, _ in files)
    for _, nbytes, p in sorted(files):
        if total <= bound:
            break
        if p == keep:
            continue
        p.unlink(missing_ok=True)
        total -= nbytes


def open_cached(url: str, opts: remote.IOOptions):
    """The shard at `url` from the cache, downloading it first if needed; a local file object."""
    cache_dir = Path(opts.cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir '{cache_dir}' cannot be created ({exc.strerror}): "
                        "choose another directory or unset it") from None
    dest = cache_path(cache_dir, url)
    want_bytes, want_sha = opts.expected.get(url, (None, None))
    # A cached file was verified when it was downloaded and only ever appears by rename: a hit
    # checks its size, not its sha256 (hashing every shard on every epoch would cost a core).
    if dest.is_file() and (want_bytes is None or dest.stat().st_size == want_bytes):
        os.utime(dest)  # most recently used
        return open(dest, "rb")
    for attempt in range(2):
        nbytes, sha = _download(url, dest, opts)
        if (want_bytes is None or nbytes == want_bytes) and (want_sha is None or sha == want_sha):
            break
        dest.unlink(missing_ok=True)
        if attempt:
            raise DataError(f"'{url}' does not match its manifest ({nbytes} bytes, sha256 {sha[:12]}... "
                            f"vs {want_bytes} bytes, {str(want_sha)[:12]}...): re-run `simscale "
                            "prepare` or `simscale prepare --index` for this location")
    evict(cache_dir, opts.cache_bytes, keep=dest)
    return open(dest, "rb")

