"""Opening one shard: a local path as a plain file, a URL through the local cache or streamed.

The one place that chooses between them, above both `shard_cache.py` (download once, keep) and
`remote.py` (retrying range reads); every reader (training stream, eval features, online k-NN,
`prepare --index`) passes its `IOOptions` here explicitly.
"""
from __future__ import annotations

from simscale.data import remote
from simscale.data.shard_cache import open_cached


def open_shard(url: str, opts: remote.IOOptions | None = None):
    """A binary file object for one shard (`opts`: the run's I/O options; defaults if None)."""
    if not remote.is_url(url):
        return open(url.removeprefix("file://"), "rb")
    opts = opts or remote.IOOptions()
    if opts.cache_dir:
        return open_cached(url, opts)
    return remote.open_url(url, opts)
