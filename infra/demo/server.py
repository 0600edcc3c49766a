"""A local HTTP server for the demo crawl (127.0.0.1 only), with routes that misbehave on purpose.

Routes (``<file>`` is a file of ``images/``):

- ``/img/<file>``: the file (``not_an_image.jpg`` is served as image/jpeg; ``.svg`` as image/svg+xml);
- ``/status/<code>/...``: that status; ``/slow/...``: waits ``slow_seconds`` before answering;
- ``/ratelimit/<s>/<file>``: 429 with ``Retry-After: s``, always; ``/ratelimit-once/<s>/<file>``: 429 with
  ``Retry-After: s`` on the first request of the path, the file afterwards;
- ``/fail-first/<n>/<file>``: 500 for the first n requests of the path, the file afterwards (retry tests);
- ``/reset/...``: the connection is reset (RST) without an answer; ``/close/...``: closed without an answer;
- ``/redirect/loop/<name>``: redirects to itself; ``/redirect/to/<file>``: redirects to ``/img/<file>``;
  ``/redirect/metadata/...``: redirects to the cloud metadata address 169.254.169.254 (the client must refuse);
- ``/ctype/<type>/<subtype>/<file>``: the file with that Content-Type (wrong content types);
- ``/robots/<directive>/<file>``: the file with an ``X-Robots-Tag: <directive>`` header;
- ``/trickle/<file>``: the headers, then one byte every 0.25 s (a server that never times out per read);
- ``/big/<n>``: n bytes of a valid-looking JPEG header then zeros, with their Content-Length.

The server only ever answers; it never opens a connection itself.
"""

from __future__ import annotations

import contextlib
import mimetypes
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
METADATA_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _handler(root: Path, slow_seconds: float, hits: Counter, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts): expected
                self.wfile.write(body)

        def _file(self, name: str, ctype: str | None = None, headers: dict[str, str] | None = None) -> None:
            f = root / name
            if "/" in name or not name or not f.is_file():
                self._send(404, b"not found", "text/plain")
                return
            if ctype is None:
                ctype = "image/jpeg" if f.name == "not_an_image.jpg" else (mimetypes.guess_type(f.name)[0] or "")
            self._send(200, f.read_bytes(), ctype or "application/octet-stream", headers)

        def _count(self) -> int:
            with lock:
                hits[self.path] += 1
                return hits[self.path]

        def _drop_connection(self, reset: bool) -> None:
            if reset:  # SO_LINGER 0: close() sends RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def do_GET(self) -> None:
            p = [x for x in self.path.split("?")[0].split("/") if x]
            route, last = (p[0] if p else ""), (p[-1] if p else "")
            n = self._count()
            if route == "img" and len(p) == 2:
                self._file(last)
            elif route == "status" and len(p) >= 2 and p[1].isdigit():
                self._send(int(p[1]), b"status route", "text/plain")
            elif route == "slow":
                time.sleep(slow_seconds)
                self._send(200, b"late", "image/jpeg")
            elif route in ("ratelimit", "ratelimit-once") and len(p) == 3 and p[1].isdigit():
                if route == "ratelimit" or n == 1:
                    self._send(429, b"slow down", "text/plain", {"Retry-After": p[1]})
                else:
                    self._file(last)
            elif route == "fail-first" and len(p) == 3 and p[1].isdigit():
                if n <= int(p[1]):
                    self._send(500, b"flaky", "text/plain")
                else:
                    self._file(last)
            elif route in ("reset", "close"):
                self._drop_connection(reset=route == "reset")
            elif route == "redirect" and len(p) == 3 and p[1] in ("loop", "to", "metadata"):
                target = {"loop": self.path, "to": f"/img/{last}", "metadata": METADATA_URL}[p[1]]
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif route == "ctype" and len(p) == 4:
                self._file(last, ctype=f"{p[1]}/{p[2]}")
            elif route == "robots" and len(p) == 3:
                self._file(last, headers={"X-Robots-Tag": p[1]})
            elif route == "trickle" and len(p) == 2:
                self._trickle(last)
            elif route == "big" and len(p) == 2 and p[1].isdigit():
                n = int(p[1])
                self._send(200, b"\xff\xd8\xff\xe0" + b"\0" * max(0, n - 4), "image/jpeg")
            else:
                self._send(404, b"not found", "text/plain")

        def _trickle(self, name: str) -> None:
            body = (root / name).read_bytes() if (root / name).is_file() else b"x" * 64
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for i in range(min(len(body), 200)):  # at most ~50 s, and only while the client listens
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.25)
                self.wfile.write(body[200:])
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog of 5 drops connections under a crawler's concurrency
    daemon_threads = True


class DemoServer:
    """``with DemoServer(images_dir, port): ...`` serves the crawl on 127.0.0.1 for the duration."""

    def __init__(self, images_dir: Path, port: int, slow_seconds: float = 4.0):
        self.images_dir = Path(images_dir)
        self.port = port
        self.slow_seconds = slow_seconds
        self.hits: Counter = Counter()  # requests per path (tests check what was fetched again)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> DemoServer:
        try:
            handler = _handler(self.images_dir, self.slow_seconds, self.hits, threading.Lock())
            self._server = _Server((HOST, self.port), handler)
        except OSError as err:
            raise OSError(
                f"demo crawl server cannot listen on {HOST}:{self.port} ({err}); the crawl of this run was built "
                "for that port: free it, or start a new run"
            ) from err
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-crawl-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
