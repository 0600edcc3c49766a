"""A local HTTP server for the demo crawl (127.0.0.1 only), with routes that misbehave on purpose.

Routes: ``/img/<file>`` serves a file of ``images/``; ``/status/<code>/...`` answers with that status;
``/slow/...`` waits ``slow_seconds`` before answering (past the ingest timeout).
"""

from __future__ import annotations

import mimetypes
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _handler(root: Path, slow_seconds: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeouts): expected

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            parts = [p for p in self.path.split("?")[0].split("/") if p]
            if len(parts) >= 2 and parts[0] == "status" and parts[1].isdigit():
                self._send(int(parts[1]), b"status route", "text/plain")
            elif parts and parts[0] == "slow":
                time.sleep(slow_seconds)
                self._send(200, b"late", "image/jpeg")
            elif len(parts) == 2 and parts[0] == "img" and (root / parts[1]).is_file() and "/" not in parts[1]:
                f = root / parts[1]
                ctype = "image/jpeg" if f.name == "not_an_image.jpg" else (mimetypes.guess_type(f.name)[0] or "")
                self._send(200, f.read_bytes(), ctype or "application/octet-stream")
            else:
                self._send(404, b"not found", "text/plain")

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
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> DemoServer:
        try:
            self._server = _Server((HOST, self.port), _handler(self.images_dir, self.slow_seconds))
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
