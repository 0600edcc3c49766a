"""The HTTP opener img2dataset downloads through: guarded connections, one deadline per URL, checked redirects.

img2dataset calls ``urllib.request.urlopen``, whose only hook is the process-wide opener: :func:`guarded_opener`
installs ours for the duration of the downloads and restores the previous one after (one policy at a time; every
shard of a run uses the same ingest config). It

- connects only to checked addresses: the host must be a validated name or IP literal (nothing else is handed to
  the resolver), every address it resolves to is checked against the destination policy, and only then is one
  connected to (:mod:`curation.netguard`);
- holds every URL to one wall-clock deadline, ``ingest.max_download_seconds`` from the first request: resolution
  (in a helper thread, abandoned at the deadline), connect, TLS handshake, request, each header line, every
  redirect hop and the body all time out at the deadline. ``ingest.timeout`` still bounds each socket operation;
- follows redirects itself: the target is resolved against the current URL, normalised and checked like a listed
  URL (``redirect_refused`` with the guard's reason, ``redirect_malformed`` when it cannot be normalised, whatever
  its scheme: ``file:``, ``data:``, ``javascript:``...), loops are stopped, the redirect's body is not read;
- refuses wrong content types before reading the body, caps the body size, treats a body shorter than its
  Content-Length as a closed connection, waits out short ``Retry-After`` answers to 429/503 once and records long
  ones in the error message.
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import mimetypes
import os
import re
import socket
import ssl
import threading
import time
import urllib.request
import urllib.response
from collections.abc import Iterator
from http.client import HTTPConnection, HTTPResponse, HTTPSConnection, IncompleteRead
from typing import Any
from urllib.error import HTTPError
from urllib.parse import urljoin

from curation.netguard import DestinationPolicy, UrlGuard, local_file, validated_host
from infra.config.ingest import IngestConfig

DEADLINE_MESSAGE = "download took longer than max_download_seconds: timed out"
_POLICY: dict[str, Any] = {}
_LOCK = threading.Lock()
_TLS = threading.local()  # the deadline of the connection whose TLS handshake runs in this thread


class DestinationRefused(OSError):
    """A host resolved to an address the policy refuses (raised before connecting)."""


class UnvalidatedHost(OSError):
    """A host that is neither an IP literal nor a DNS name reached the connection (never resolved)."""


def _left(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (None: no deadline); TimeoutError once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(DEADLINE_MESSAGE)
    return left


class _Deadline:
    """Socket methods that bound every blocking call by the URL's deadline (and the per-operation timeout)."""

    lvd_deadline: float | None = None
    lvd_op_timeout: float | None = None

    def _arm(self) -> None:
        deadline = self.lvd_deadline if self.lvd_deadline is not None else getattr(_TLS, "deadline", None)
        left = _left(deadline)
        if left is not None:
            op = self.lvd_op_timeout
            self.settimeout(left if op is None else min(op, left))  # type: ignore[attr-defined]

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self._arm()
        try:
            return getattr(super(), name)(*args, **kwargs)
        except TimeoutError:
            _left(self.lvd_deadline if self.lvd_deadline is not None else getattr(_TLS, "deadline", None))
            raise

    def recv_into(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("recv_into", *args, **kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("recv", *args, **kwargs)

    def send(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("send", *args, **kwargs)

    def sendall(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("sendall", *args, **kwargs)


class _DeadlineSocket(_Deadline, socket.socket):
    pass


class _DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
    def do_handshake(self, *args: Any, **kwargs: Any) -> Any:  # the whole handshake is one call: bounded as one
        return self._call("do_handshake", *args, **kwargs)


def _resolve(host: str, port: int, deadline: float | None) -> list[Any]:
    """getaddrinfo, given up at the deadline (the lookup thread is left to finish on its own). An IP literal needs no
    lookup: it is resolved in this thread."""
    try:
        ipaddress.ip_address(host)
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except ValueError:
        pass
    result: dict[str, Any] = {}

    def lookup() -> None:
        try:
            result["infos"] = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except OSError as err:
            result["error"] = err

    worker = threading.Thread(target=lookup, name="lvd-resolve", daemon=True)
    worker.start()
    worker.join(_left(deadline))
    if worker.is_alive():
        raise TimeoutError(DEADLINE_MESSAGE)
    if "error" in result:
        raise result["error"]
    return result["infos"]


def guarded_connection(address: tuple[str, int], timeout: Any, deadline: float | None) -> socket.socket:
    """socket.create_connection, but only for a validated host, every resolved address checked before any is
    connected to, and connect bounded by the deadline."""
    policy: DestinationPolicy = _POLICY["destinations"]
    host, port = address
    name = validated_host(host)
    if name is None:
        raise UnvalidatedHost(f"refused to resolve {host[:100]!r}: not a validated host name")
    infos = _resolve(name, port, deadline)
    for *_rest, sockaddr in infos:
        addr = ipaddress.ip_address(sockaddr[0].split("%")[0])
        why = policy.refusal(addr, name)
        if why:
            raise DestinationRefused(f"destination refused: {name} resolves to {addr} ({why} address)")
    err: OSError | None = None
    op = None if timeout is socket._GLOBAL_DEFAULT_TIMEOUT else timeout
    for family, kind, proto, _name, sockaddr in infos:
        sock = _DeadlineSocket(family, kind, proto)
        sock.lvd_deadline, sock.lvd_op_timeout = deadline, op
        try:
            sock._call("connect", sockaddr)
            return sock
        except OSError as e:
            err = e
            sock.close()
            if isinstance(e, TimeoutError) and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(DEADLINE_MESSAGE) from e
    raise err or OSError(f"getaddrinfo returned nothing for {name}")


class _GuardedHTTPConnection(HTTPConnection):
    def __init__(self, *args: Any, lvd_deadline: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lvd_deadline = lvd_deadline
        self._create_connection = self._connect_checked  # http.client sets it per instance

    def _connect_checked(self, address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> Any:
        return guarded_connection(address, timeout, self.lvd_deadline)


class _GuardedHTTPSConnection(HTTPSConnection):
    def __init__(self, *args: Any, lvd_deadline: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lvd_deadline = lvd_deadline
        self._create_connection = self._connect_checked
        self._context.sslsocket_class = _DeadlineSSLSocket  # a context of its own (http.client makes one each)

    def _connect_checked(self, address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> Any:
        return guarded_connection(address, timeout, self.lvd_deadline)

    def connect(self) -> None:
        _TLS.deadline = self.lvd_deadline
        try:
            super().connect()
        finally:
            _TLS.deadline = None
        if isinstance(self.sock, _Deadline):
            self.sock.lvd_deadline, self.sock.lvd_op_timeout = self.lvd_deadline, self.timeout


def _deadline(req: Any) -> float:
    if not hasattr(req, "lvd_started"):
        req.lvd_started = time.monotonic()
    return req.lvd_started + _POLICY["cfg"].max_download_seconds


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> HTTPResponse:
        return self.do_open(_GuardedHTTPConnection, req, lvd_deadline=_deadline(req))


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> HTTPResponse:
        return self.do_open(_GuardedHTTPSConnection, req, context=self._context, lvd_deadline=_deadline(req))


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*:")


def redirect_target(current: str, location: str) -> str:
    """The Location header (decoded as UTF-8, as browsers do; http.client hands it over as Latin-1) resolved
    against the current URL; ValueError when it cannot be (``http://[bad``)."""
    raw = location.encode("latin-1", "replace")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in raw)
    text = text.strip()
    if _SCHEME.match(text):
        return text
    return urljoin(current, text.replace("\\", "/"))


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Every redirect target normalised and checked by the guard before it is followed (urllib's own handler
    refuses some schemes with a message of its own and fails on malformed targets with a bare ValueError)."""

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        location = headers.get("location") or headers.get("uri")
        if location is None:
            return None  # not followed: recorded as http_<code>
        guard: UrlGuard = _POLICY["guard"]
        try:
            target = redirect_target(req.full_url, location)
        except ValueError:
            target = location
        verdict = guard.decide(target)
        if verdict.reason == "url_malformed":
            raise HTTPError(req.full_url, code, f"redirect to a malformed URL: {location[:200]}", headers, fp)
        if verdict.reason:
            raise HTTPError(req.full_url, code, f"redirect to a refused URL ({verdict.reason}): {target[:200]}",
                            headers, fp)  # fmt: skip
        assert verdict.url is not None
        new = self.redirect_request(req, fp, code, msg, headers, verdict.url)
        if new is None:
            return None
        visited = new.redirect_dict = getattr(req, "redirect_dict", {})
        if visited.get(verdict.url, 0) >= self.max_repeats or len(visited) >= self.max_redirections:
            raise HTTPError(req.full_url, code, self.inf_msg + msg, headers, fp)
        visited[verdict.url] = visited.get(verdict.url, 0) + 1
        new.lvd_started = getattr(req, "lvd_started", time.monotonic())
        fp.close()  # the redirect's own body is never read (it could be endless)
        return self.parent.open(new, timeout=req.timeout)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds from now (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _RetryAfterHandler(urllib.request.BaseHandler):
    """429/503 with a short Retry-After: wait, ask once more. Otherwise the wait asked for is in the error."""

    def _retry(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        cfg: IngestConfig = _POLICY["cfg"]
        raw = headers.get("Retry-After")
        wait = retry_after_seconds(raw)
        elapsed = time.monotonic() - getattr(req, "lvd_started", time.monotonic())
        if (
            wait is not None
            and not getattr(req, "lvd_retried", False)
            and wait <= cfg.retry_after_max
            and elapsed + wait < cfg.max_download_seconds
        ):
            fp.close()
            time.sleep(wait)
            req.lvd_retried = True
            return self.parent.open(req, timeout=req.timeout)
        raise HTTPError(req.full_url, code, f"{msg} (Retry-After: {raw})" if raw else msg, headers, fp)

    http_error_429 = http_error_503 = _retry


class _LimitedResponse:
    """The response as img2dataset uses it (``with``, ``.headers``, ``.read()``), with a size and time limit."""

    def __init__(self, resp: HTTPResponse, max_bytes: int, deadline: float):
        self._resp, self.headers, self._max, self._deadline = resp, resp.headers, max_bytes, deadline
        self.status, self.url = resp.status, resp.url

    def read(self, amt: int | None = None) -> bytes:
        parts, n = [], 0
        while True:
            block = self._resp.read1(1 << 16)  # what one recv brings: a trickle cannot block past the deadline
            if not block:
                if self._resp.length:  # read1 returns b"" at a premature end instead of raising
                    raise IncompleteRead(b"".join(parts), self._resp.length)
                return b"".join(parts)
            n += len(block)
            if n > self._max:
                raise ValueError(f"response larger than {self._max} bytes: refused")
            _left(self._deadline)
            parts.append(block)

    def close(self) -> None:
        self._resp.close()

    def __enter__(self) -> _LimitedResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ResponseGuard(urllib.request.BaseHandler):
    handler_order = 1001  # after HTTPErrorProcessor: only successful responses get here

    def http_request(self, req: Any) -> Any:
        _deadline(req)  # the clock starts at the first request of a URL
        return req

    def http_response(self, req: Any, resp: HTTPResponse) -> Any:
        if isinstance(resp, _LimitedResponse):  # a redirect or retry answered through the chain already
            return resp
        cfg: IngestConfig = _POLICY["cfg"]
        ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype and not any(ctype.startswith(p) for p in cfg.accept_content_types):
            resp.close()
            raise ValueError(f"refused content type {ctype!r}")
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > cfg.max_download_bytes:
            resp.close()
            raise ValueError(f"response larger than {cfg.max_download_bytes} bytes: refused (Content-Length {length})")
        return _LimitedResponse(resp, cfg.max_download_bytes, _deadline(req))

    https_request = http_request
    https_response = http_response


class _LocalFileHandler(urllib.request.BaseHandler):
    """file:// under ``ingest.local_roots`` only (checked again at open: a link changed since planning is refused),
    with the same content-type and size limits as a download."""

    def file_open(self, req: Any) -> urllib.response.addinfourl:
        cfg: IngestConfig = _POLICY["cfg"]
        path = local_file(req.full_url, cfg.local_roots)
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if not any(ctype.startswith(p) for p in cfg.accept_content_types):
            raise ValueError(f"refused content type {ctype!r} (from the file name)")
        f = open(path, "rb")  # noqa: SIM115 (the response owns it: img2dataset closes it)
        size = os.fstat(f.fileno()).st_size
        if size > cfg.max_download_bytes:
            f.close()
            raise ValueError(f"response larger than {cfg.max_download_bytes} bytes: refused (file of {size} bytes)")
        headers = email.message_from_string(f"Content-Type: {ctype}\nContent-Length: {size}\n")
        return urllib.response.addinfourl(f, headers, req.full_url, 200)


def _build_opener() -> urllib.request.OpenerDirector:
    opener = urllib.request.OpenerDirector()  # http(s), and file: only under ingest.local_roots; no ftp: or data:
    for handler in (
        urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(), _GuardedHTTPHandler(), _GuardedHTTPSHandler(),
        _GuardedRedirectHandler(), _RetryAfterHandler(), _ResponseGuard(),
    ):
        opener.add_handler(handler)
    if _POLICY["cfg"].local_roots:
        opener.add_handler(_LocalFileHandler())
    return opener


def install_opener(cfg: IngestConfig) -> None:
    """Make ``urllib.request.urlopen`` (img2dataset's fetch) go through the guard for this process, for good.
    Prefer :func:`guarded_opener`, which restores the previous opener afterwards."""
    with _LOCK:
        _POLICY.update(cfg=cfg, guard=UrlGuard(cfg), destinations=DestinationPolicy.from_config(cfg))
        urllib.request.install_opener(_build_opener())


_SCOPE: dict[str, Any] = {"depth": 0, "previous": None}


@contextlib.contextmanager
def guarded_opener(cfg: IngestConfig) -> Iterator[None]:
    """The guarded opener while downloads run, then whatever was installed before (nothing: urllib's default).

    Nested and concurrent scopes (shards downloading in parallel threads) share one opener; the previous one
    comes back when the last scope exits, so code outside ingestion (Prefect's client, the report's browser
    test) never goes through the crawler's policy.
    """
    with _LOCK:
        if _SCOPE["depth"] == 0:
            _SCOPE["previous"] = urllib.request._opener  # None when urllib's default is in use
        _POLICY.update(cfg=cfg, guard=UrlGuard(cfg), destinations=DestinationPolicy.from_config(cfg))
        urllib.request.install_opener(_build_opener())
        _SCOPE["depth"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _SCOPE["depth"] -= 1
            if _SCOPE["depth"] == 0:
                urllib.request.install_opener(_SCOPE["previous"])
                _SCOPE["previous"] = None
