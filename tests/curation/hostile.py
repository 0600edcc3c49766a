"""A loopback HTTP server whose every answer is scripted byte by byte, and a resolver/connect sandbox.

:class:`HostileServer` serves ``/s/<n>`` with the n-th :class:`Behaviour` added: a delay before the status line,
header lines trickled with a gap, a body trickled in pieces, a wrong or missing Content-Length, a reset (RST) or
close after a given number of bytes, a redirect anywhere, or silence. It only ever answers on 127.0.0.1.

:class:`Sandbox` replaces ``socket.getaddrinfo`` (names resolve only through its table; every lookup is recorded)
and ``socket.socket.connect`` (every attempt is recorded; anything but 127.0.0.1 is refused without a packet).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"


@dataclass
class Behaviour:
    status: int = 200
    body: bytes = b""
    ctype: str | None = "image/png"
    headers: list[tuple[str, str]] = field(default_factory=list)
    length_delta: int | None = 0  # Content-Length = len(body) + delta; None: no Content-Length
    delay: float = 0.0  # before the status line
    header_gap: float = 0.0  # between header lines
    body_gap: float = 0.0  # between body pieces of ``piece`` bytes
    piece: int = 1 << 16
    cut_at: int | None = None  # stop after this many bytes of the whole answer...
    reset: bool = False  # ... with RST instead of FIN (also without cut_at: no answer at all)
    silent: bool = False  # read the request, answer nothing until the client gives up
    raw: bytes | None = None  # send exactly these bytes instead of an HTTP answer

    def head(self) -> list[bytes]:
        lines = [f"HTTP/1.1 {self.status} X".encode()]
        if self.ctype:
            lines.append(f"Content-Type: {self.ctype}".encode())
        if self.length_delta is not None:
            lines.append(f"Content-Length: {max(0, len(self.body) + self.length_delta)}".encode())
        lines += [f"{k}: {v}".encode() for k, v in self.headers]
        lines.append(b"Connection: close")
        return [line + b"\r\n" for line in lines] + [b"\r\n"]


class HostileServer:
    def __init__(self, non_http: str = "silent") -> None:
        self.non_http = non_http  # a TLS ClientHello: "silent" (a handshake that hangs) or "answer" (plain HTTP back)
        self.behaviours: list[Behaviour] = []
        self.hits: Counter[str] = Counter()
        self._stop = threading.Event()
        self._listener = socket.create_server((HOST, 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()

    def url(self, behaviour: Behaviour, scheme: str = "http") -> str:
        with self._lock:
            self.behaviours.append(behaviour)
            return f"{scheme}://{HOST}:{self.port}/s/{len(self.behaviours) - 1}"

    def path_of(self, n: int) -> str:
        return f"/s/{n}"

    def __enter__(self) -> HostileServer:
        threading.Thread(target=self._serve, name="hostile-server", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                path = _request_path(conn)
                if not path.startswith("/") and self.non_http == "silent":
                    self._stop.wait(30)
                    return
                self.hits[path] += 1
                n = int(path.split("?")[0].split("/")[2]) if path.startswith("/s/") else -1
                b = self.behaviours[n] if 0 <= n < len(self.behaviours) else Behaviour(404, b"", "text/plain")
                self._play(conn, b)
            except (OSError, ValueError, IndexError):
                pass

    def _play(self, conn: socket.socket, b: Behaviour) -> None:
        if b.silent:
            self._stop.wait(30)
            return
        if b.reset and b.cut_at is None:
            return _rst(conn)
        if b.raw is not None:
            conn.sendall(b.raw)
            return None
        self._stop.wait(b.delay)
        sent = 0
        parts = b.head()
        for i, line in enumerate(parts):
            if i and b.header_gap:
                self._stop.wait(b.header_gap)
            sent = self._send(conn, line, sent, b)
            if sent < 0:
                return
        for k in range(0, len(b.body), b.piece):
            if k and b.body_gap:
                self._stop.wait(b.body_gap)
            sent = self._send(conn, b.body[k : k + b.piece], sent, b)
            if sent < 0:
                return

    def _send(self, conn: socket.socket, data: bytes, sent: int, b: Behaviour) -> int:
        if b.cut_at is not None and sent + len(data) >= b.cut_at:
            conn.sendall(data[: max(0, b.cut_at - sent)])
            if b.reset:
                _rst(conn)
            return -1
        conn.sendall(data)
        return sent + len(data)


def _request_path(conn: socket.socket) -> str:
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        block = conn.recv(4096)
        if not block or not (data + block)[:3].isalpha():  # not HTTP (a TLS ClientHello): answer at once
            data += block
            break
        data += block
    return data.split(b" ", 2)[1].decode("latin-1") if data.count(b" ") >= 2 else ""


def _rst(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Sandbox:
    """Install with :meth:`install` (a pytest MonkeyPatch); names resolve only through ``names``."""

    def __init__(self, names: dict[str, str] | None = None, slow: dict[str, float] | None = None):
        self.names = dict(names or {})
        self.slow = dict(slow or {})
        self.lookups: list[str] = []
        self.connects: list[str] = []
        self._real_connect = socket.socket.connect
        self._real_getaddrinfo = socket.getaddrinfo

    def install(self, mp: Any) -> Sandbox:
        mp.setattr(socket, "getaddrinfo", self.getaddrinfo)
        mp.setattr(socket.socket, "connect", self._connect_hook())
        return self

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        host = host.decode() if isinstance(host, bytes) else str(host)
        self.lookups.append(host)
        if host in self.slow:
            time.sleep(self.slow[host])
        try:
            ipaddress.ip_address(host.split("%")[0])
            return self._real_getaddrinfo(host, port, *args, **kwargs)  # a literal: no DNS involved
        except ValueError:
            pass
        if host.lower().rstrip(".") not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addr = self.names[host.lower().rstrip(".")]
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sockaddr = (addr, port, 0, 0) if fam == socket.AF_INET6 else (addr, port)
        return [(fam, socket.SOCK_STREAM, 6, "", sockaddr)]

    def _connect_hook(self) -> Any:
        sandbox = self

        def connect(sock: socket.socket, address: Any) -> Any:
            host = address[0] if isinstance(address, tuple) else str(address)
            sandbox.connects.append(host)
            if host != HOST:
                raise ConnectionRefusedError(111, "Connection refused (test sandbox: nothing leaves the machine)")
            return sandbox._real_connect(sock, address)

        return connect
