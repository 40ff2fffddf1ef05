"""Real servers on 127.0.0.1 for the remote-shard tests: an HTTP file server with Range support
and injectable faults, and moto's S3 server. Both bind port 0 (a free port) and stop on exit."""
from __future__ import annotations

import contextlib
import html
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers: a drop must break a live connection

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _reply(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool):
        srv: LoopbackHTTP = self.server.owner
        rng = self.headers.get("Range")
        with srv.lock:
            srv.log.append((self.command, self.path, rng))
            fail = srv.fail_503 > 0
            srv.fail_503 -= fail
        if fail:
            return self._reply(503, b"busy", head=head)
        rel = unquote(self.path.split("?", 1)[0]).lstrip("/")
        path = srv.root / rel
        if path.is_dir():  # an index page whose links fsspec's HTTP `ls` follows
            links = "".join(f'<a href="{html.escape(p.name)}">{html.escape(p.name)}</a>\n'
                            for p in sorted(path.iterdir()))
            return self._reply(200, links.encode(), {"Content-Type": "text/html"}, head)
        if not path.is_file():
            return self._reply(404, b"not found", head=head)
        data = path.read_bytes()
        start, end, code = 0, len(data) - 1, 200
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/x-tar"}
        if rng and rng.startswith("bytes="):
            a, b = rng[6:].split("-")
            start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            code = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start:end + 1]
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        with srv.lock:
            stall = srv.stall_at.get("/" + rel)
            if stall is not None and start <= stall[0] < end + 1:
                del srv.stall_at["/" + rel]
            else:
                stall = None
        if stall is not None:  # part of the body, then silence: a hung peer the reader must time out
            with contextlib.suppress(OSError):
                self.wfile.write(body[:stall[0] - start])
                self.wfile.flush()
                time.sleep(stall[1])
                self.wfile.write(body[stall[0] - start:])
            return
        with srv.lock:
            drop = srv.drop_at.get("/" + rel)
            if drop is not None and start <= drop < end + 1:
                del srv.drop_at["/" + rel]
                srv.dropped.append(("/" + rel, drop))
            else:
                drop = None
        if drop is None:
            self.wfile.write(body)
            return
        # Part of the body, then the connection dies: what a reset or a crashed proxy looks like.
        self.wfile.write(body[:drop - start])
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class LoopbackHTTP:
    """Serves `root` on 127.0.0.1. Faults: `fail_503` next requests answer 503; `drop_at[path] = k`
    drops the connection once after byte k of that file; `stall_at[path] = (k, s)` goes silent
    for s seconds once after byte k."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.lock = threading.Lock()
        self.log: list[tuple] = []
        self.fail_503 = 0
        self.drop_at: dict[str, int] = {}
        self.stall_at: dict[str, tuple[int, float]] = {}
        self.dropped: list[tuple] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def gets(self, suffix: str = ".tar") -> list[tuple]:
        with self.lock:
            return [e for e in self.log if e[0] == "GET" and e[1].endswith(suffix)]


@contextlib.contextmanager
def moto_s3(monkeypatch):
    """moto's S3 server on a free loopback port; the standard AWS_* variables point at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    import s3fs

    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://127.0.0.1:{port}"
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            monkeypatch.delenv(k, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # cached clients keep the endpoint they were made with
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
