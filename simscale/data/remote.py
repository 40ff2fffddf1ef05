"""Shards behind a URL (http(s)://, s3://, gs://, any fsspec protocol): open, read, list, upload.

Why fsspec (+ s3fs, + gcsfs for gs://): one file-object interface for every store, with
seekable range reads (a retry resumes at the byte it reached instead of re-reading the
shard), credentials and endpoints from the standard environment (`AWS_ACCESS_KEY_ID`,
`AWS_ENDPOINT_URL`, `AWS_PROFILE`, `GOOGLE_APPLICATION_CREDENTIALS`, ...) and no external
binaries. webdataset's own `pipe:`/curl opener shells out to curl/aws/gsutil, cannot resume a
dropped connection at an offset and reports failures as a broken pipe.

Streaming: a shard is read in `block_size` range requests as the tar reader consumes it (no
full download first). A transient failure (connection dropped mid-tar, timeout, 5xx, 429)
closes the file, waits (exponential backoff with jitter) and reopens it at the byte offset
already delivered, so the tar reader never sees a gap or a repeat: every sample is read
exactly once. After `retries` consecutive failures: one DataError line naming the URL.

fsspec, s3fs and aiohttp are imported on first use only: local-only runs never pay for them.
"""
from __future__ import annotations

import io
import os
import random
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from simscale.errors import DataError

SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://")
_BLOCK = 8 << 20


@dataclass
class IOOptions:
    retries: int = 5  # consecutive transient failures tolerated per read
    timeout: float = 60.0  # seconds for a connect or a read to make progress
    backoff: float = 1.0  # first wait; doubles per consecutive failure (capped at 30 s)
    block_size: int = _BLOCK  # bytes per range request
    cache_dir: str = ""  # local shard cache (simscale/data/shard_cache.py); "" = stream
    cache_bytes: int = 0  # bound of the cache; least recently used shards are evicted past it
    expected: dict = field(default_factory=dict)  # url -> (bytes, sha256) from the manifest

    @classmethod
    def from_config(cls, d) -> IOOptions:
        """From the data config (data.io_*, data.cache_*): every reader of a run gets this value."""
        return cls(retries=d.io_retries, timeout=d.io_timeout, cache_dir=d.cache_dir,
                   cache_bytes=int(d.cache_gb * 2**30))


def is_url(spec: str | Path) -> bool:
    return "://" in str(spec) and not str(spec).startswith("file://")


def join(base: str, name: str) -> str:
    """`base/name` for a URL or a local path; a name that is itself a URL or absolute wins."""
    if is_url(name) or name.startswith("/"):
        return name
    if is_url(base):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


# ---------------------------------------------------------------------------------------------
# Filesystems

_inherited: list = []  # a forked child's copies of the parent's storage clients, never closed here


def _keep_inherited_clients() -> None:
    """In a forked child (DataLoader worker, prepare worker): leave the parent's fsspec clients alone.
    fsspec drops a parent's filesystem instances in a new pid; collecting them here would close the
    inherited aiohttp/aiobotocore connections through their finalizers, and those sockets and the
    event loop's epoll set are shared with the parent: the parent's next request on such a pooled
    connection then waits for its read timeout (60 s stalls, seen in tests). Keeping the objects
    alive (a forked worker ends with os._exit, so nothing closes them) lets the child open its own."""
    for fin in list(getattr(weakref.finalize, "_registry", {})):
        info = fin.peek()
        if info is not None and getattr(info[1], "__name__", "") == "close_session":
            _inherited.append(info)  # (instance, close_session, loop, session): alive, so no __del__ closes
            fin.detach()


os.register_at_fork(after_in_child=_keep_inherited_clients)


def filesystem(url: str, opts: IOOptions | None = None):
    """(fsspec filesystem, path) for `url`, with timeouts; a missing backend is a DataError."""
    opts = opts or IOOptions()
    protocol = url.split("://", 1)[0].lower()
    try:
        import fsspec

        if protocol in ("http", "https"):
            import aiohttp

            timeout = aiohttp.ClientTimeout(total=None, sock_connect=opts.timeout, sock_read=opts.timeout)
            fs = fsspec.filesystem("http", client_kwargs={"timeout": timeout})
        elif protocol in ("s3", "s3a"):
            # botocore's own retries stay few: the retry loop below owns backoff and the final error.
            fs = fsspec.filesystem("s3", use_listings_cache=False, config_kwargs={
                "connect_timeout": opts.timeout, "read_timeout": opts.timeout,
                "retries": {"max_attempts": 2, "mode": "standard"}})
        elif protocol in ("gs", "gcs"):
            fs = fsspec.filesystem("gcs", timeout=opts.timeout)
        else:
            fs = fsspec.filesystem(protocol)
    except ImportError as exc:
        need = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(protocol, exc.name or "?")
        raise DataError(f"reading '{url}' needs the Python package '{need}', which is not installed: "
                        f"pip install {need} (at the version matching fsspec)") from None
    except ValueError:
        raise DataError(f"'{url}': unknown storage protocol '{protocol}://': use a local path, "
                        "http(s)://, s3:// or gs://") from None
    return fs, (url if protocol in ("http", "https") else fs._strip_protocol(url))


def _unwrap(exc: BaseException) -> BaseException:
    # fsspec's HTTP backend reports any failed size probe (a 503, a refused connection) as
    # FileNotFoundError from the real error: classify the cause, unless it is a true 404.
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and cause is not None and getattr(cause, "status", None) != 404:
        return cause
    return exc


def _transient(exc: BaseException) -> bool:
    """Worth another try: connection drops, timeouts, 5xx/429. Not: missing, forbidden, bad URL."""
    exc = _unwrap(exc)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(exc, (OSError, TimeoutError, EOFError)):
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ClientError", "ClientPayloadError", "ServerDisconnectedError",
                         "FSTimeoutError", "ResponseStreamingError", "ReadTimeoutError",
                         "EndpointConnectionError", "IncompleteReadError", "ContentLengthError"})


def _final_error(url: str, exc: BaseException, tries: int) -> DataError:
    exc = _unwrap(exc)
    why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}".rstrip(": ")
    if isinstance(exc, FileNotFoundError):
        return DataError(f"'{url}' not found: check the URL (a `simscale prepare` output holds "
                         "manifest.json and its shards)")
    if isinstance(exc, PermissionError) or "Credential" in type(exc).__name__:
        return DataError(f"access to '{url}' denied ({why}): check the credentials in the environment "
                         "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_PROFILE, "
                         "GOOGLE_APPLICATION_CREDENTIALS)")
    if not _transient(exc):
        return DataError(f"cannot read '{url}' ({why}): check the URL and the endpoint "
                         "(AWS_ENDPOINT_URL for S3-compatible stores)")
    return DataError(f"cannot read '{url}' after {tries} tries ({why}): check the network and the "
                     "endpoint, or raise data.io_retries / data.io_timeout")


def with_retries(url: str, fn: Callable, opts: IOOptions | None = None, on_failure: Callable | None = None):
    """fn() with up to opts.retries retries on transient errors; `on_failure` runs before a retry."""
    opts = opts or IOOptions()
    failures = 0
    while True:
        try:
            return fn()
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised as one line
            failures += 1
            if not _transient(exc) or failures > opts.retries:
                raise _final_error(url, exc, failures) from None
            if on_failure is not None:
                on_failure()
            wait = min(30.0, opts.backoff * 2 ** (failures - 1))
            time.sleep(wait * random.uniform(0.5, 1.0))


# ---------------------------------------------------------------------------------------------
# Reading

class RemoteFile(io.RawIOBase):
    """A read-only stream over a URL that survives transient failures by reopening at its offset."""

    def __init__(self, url: str, opts: IOOptions | None = None):
        self.url, self.opts = url, opts or IOOptions()
        self.offset = 0
        self._f = None
        with_retries(url, self._open, self.opts, self._drop)

    def _open(self) -> None:
        fs, path = filesystem(self.url, self.opts)
        f = fs.open(path, "rb", block_size=self.opts.block_size, cache_type="readahead")
        if self.offset:
            f.seek(self.offset)  # resume where the last good byte was delivered
        self._f = f

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass

    def _read(self, n: int) -> bytes:
        if self._f is None:
            self._open()
        return self._f.read(n)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        # At most one block per call: a failure then costs at most one range request, and the
        # retry resumes at the offset reached, not at the start of a large tar member.
        n = min(len(buffer), self.opts.block_size)
        data = with_retries(self.url, lambda: self._read(n), self.opts, self._drop)
        buffer[:len(data)] = data
        self.offset += len(data)
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


def open_url(url: str, opts: IOOptions | None = None) -> io.BufferedReader:
    return io.BufferedReader(RemoteFile(url, opts), buffer_size=1 << 20)


def read_bytes(url: str, opts: IOOptions | None = None) -> bytes:
    with open_url(url, opts) as f:
        return f.read()


def size(url: str, opts: IOOptions | None = None) -> int | None:
    """The object's size in bytes, or None if it does not exist."""
    fs, path = filesystem(url, opts)

    def probe():
        try:
            return fs.size(path)
        except FileNotFoundError:
            return None

    return with_retries(url, probe, opts)


def list_tars(url: str, opts: IOOptions | None = None) -> list[str]:
    """Sorted `*.tar` URLs directly under `url` (object stores list; HTTP needs an index page)."""
    fs, path = filesystem(url, opts)
    protocol = url.split("://", 1)[0]

    def ls():
        try:
            return fs.ls(path, detail=False)
        except FileNotFoundError:
            return []

    names = with_retries(url, ls, opts)
    out = []
    for n in names:
        n = n.rstrip("/")
        if n.endswith(".tar") and not n.rsplit("/", 1)[-1].startswith("."):
            out.append(n if "://" in n else f"{protocol}://{n}")
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Writing (prepare --out URL, prepare --index with a URL)

def _atomic_put(protocol: str) -> bool:
    # An S3/GCS object becomes visible only when its upload completes (single PUT or multipart).
    return protocol in ("s3", "s3a", "gs", "gcs")


def put_file(local: str | Path, url: str, opts: IOOptions | None = None) -> None:
    """Upload one file so that `url` is visible only once complete."""
    fs, path = filesystem(url, opts)
    protocol = url.split("://", 1)[0]
    if _atomic_put(protocol):
        with_retries(url, lambda: fs.put_file(str(local), path), opts)
        return
    tmp = path.rsplit("/", 1)
    tmp = f"{tmp[0]}/.{tmp[1]}.tmp" if len(tmp) == 2 else f".{path}.tmp"
    with_retries(url, lambda: fs.put_file(str(local), tmp), opts)
    with_retries(url, lambda: fs.mv(tmp, path), opts)


def put_bytes(data: bytes, url: str, opts: IOOptions | None = None) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile(prefix=".simscale-put-") as f:
        f.write(data)
        f.flush()
        put_file(f.name, url, opts)


def remove(url: str, opts: IOOptions | None = None) -> None:
    """Delete one object; a missing one is fine."""
    fs, path = filesystem(url, opts)

    def rm():
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    with_retries(url, rm, opts)
