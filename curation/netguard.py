"""What may be fetched, and how: the URL guard and the HTTP opener img2dataset downloads through.

Two checks keep the crawler away from private destinations (cloud metadata endpoints above all):

1. :class:`UrlGuard` before download, on the URL alone (no DNS): scheme, well-formedness, and literal addresses in
   any spelling the resolver accepts (``169.254.169.254``, ``0251.0376.0251.0376``, ``2130706433``, ``[::1]``,
   ``[::ffff:169.254.169.254]``).
2. The installed opener, right before every connection (redirects included): the host name is resolved, every
   address is checked, and only a checked address is connected to, so a public name that resolves to a private
   address (or changes its answer between check and connect) is refused without a packet sent.

img2dataset calls ``urllib.request.urlopen``, whose only hook is the process-wide opener: :func:`guarded_opener`
installs ours for the duration of the downloads and restores the previous one after (one policy at a time; every
shard of a run uses the same ingest config). Besides the address
checks it refuses wrong content types before reading the body, caps the body size and the whole download time
(a server that trickles bytes cannot hold a thread past ``max_download_seconds``), waits out short ``Retry-After``
answers to 429/503 once, and records long ones in the error message.

Local files (a folder as the pool, ``ingest.local_roots``): ``file://`` URLs are read only when their real path
lies under a root, checked by the guard and again when the opener opens the file.
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import mimetypes
import os
import socket
import threading
import time
import urllib.request
import urllib.response
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPResponse, HTTPSConnection
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import urlsplit

from infra.config.ingest import IngestConfig

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance-metadata endpoints: refused even with allow_private, unless listed exactly in allow_hosts.
METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "169.254.169.123", "100.100.100.200", "fd00:ec2::254")
)


class DestinationRefused(OSError):
    """A host resolved to an address the policy refuses (raised before connecting)."""


@dataclass(frozen=True)
class DestinationPolicy:
    allow_private: bool
    allow_names: frozenset[str]
    allow_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def from_config(cls, cfg: IngestConfig) -> DestinationPolicy:
        names, nets = set(), []
        for entry in cfg.allow_hosts:
            try:
                nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.add(entry.lower().rstrip("."))
        return cls(cfg.allow_private, frozenset(names), tuple(nets))

    def refusal(self, addr: Address, host: str | None = None) -> str | None:
        """None if ``addr`` may be connected to, else why not (``private`` or ``metadata``)."""
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if host is not None and host.lower().rstrip(".") in self.allow_names:
            return None
        if any(addr in net for net in self.allow_nets):
            return None
        if addr in METADATA:
            return "metadata"
        if addr.is_global and not addr.is_multicast:
            return None
        return None if self.allow_private else "private"


def literal_address(host: str) -> Address | None:
    """The address a host names literally, in any spelling the resolver would accept; None for names."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        pass
    try:  # decimal, octal, hex and short dotted forms (inet_aton parses them, getaddrinfo would too)
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


class LocalFileRefused(OSError):
    """A file:// URL that may not be read; ``reason`` is its ledger reason code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def local_file(url: str, roots: Sequence[Path]) -> Path:
    """The real path (symbolic links resolved) that a ``file://`` URL names, if it lies under one of ``roots``."""
    parts = urlsplit(url.strip())
    if (parts.hostname or "") not in ("", "localhost") or parts.query or parts.fragment:
        raise LocalFileRefused("url_malformed", f"file URL with a host, query or fragment: {url[:200]}")
    path = Path(urllib.request.url2pathname(parts.path))
    if not path.is_absolute():
        raise LocalFileRefused("url_malformed", f"file URL without an absolute path: {url[:200]}")
    real = Path(os.path.realpath(path))
    for root in roots:
        top = Path(os.path.realpath(root))
        if top in real.parents:
            return real
    raise LocalFileRefused("path_outside_roots", f"{path} (real path {real}) is outside ingest.local_roots")


@dataclass
class UrlGuard:
    """Refuse what must never be fetched: bad schemes, malformed URLs, literal private destinations, local files
    outside ``ingest.local_roots``."""

    cfg: IngestConfig

    def __post_init__(self) -> None:
        self.policy = DestinationPolicy.from_config(self.cfg)
        for root in self.cfg.local_roots:
            if not Path(root).is_dir():
                raise FileNotFoundError(f"ingest.local_roots: {root} is not a folder")

    def check(self, url: str) -> str | None:
        """None if the URL may be fetched, else the reason code it may not."""
        u = url.strip()
        if not u or any(c.isspace() or ord(c) < 32 for c in u):
            return "url_malformed"
        try:
            parts = urlsplit(u)
            host = parts.hostname
            _ = parts.port
        except ValueError:
            return "url_malformed"
        if parts.scheme.lower() == "file" and self.cfg.local_roots:
            try:
                local_file(u, self.cfg.local_roots)
            except LocalFileRefused as err:
                return err.reason
            return None
        if parts.scheme.lower() not in ("http", "https"):
            return "url_scheme" if parts.scheme else "url_malformed"
        if not host:
            return "url_malformed"
        addr = literal_address(host)
        if addr is not None and self.policy.refusal(addr, host):
            return "url_private"
        return None


# --- the opener --------------------------------------------------------------------------------------------

_POLICY: dict[str, Any] = {}
_LOCK = threading.Lock()


def _guarded_create_connection(
    address: tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT, source_address: Any = None, **_: Any
) -> socket.socket:
    """socket.create_connection, but every resolved address is checked before any is connected to."""
    policy: DestinationPolicy = _POLICY["destinations"]
    host, port = address
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    for *_rest, sockaddr in infos:
        addr = ipaddress.ip_address(sockaddr[0].split("%")[0])
        why = policy.refusal(addr, host)
        if why:
            raise DestinationRefused(f"destination refused: {host} resolves to {addr} ({why} address)")
    err: OSError | None = None
    for family, kind, proto, _name, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            err = e
            sock.close()
    raise err or OSError(f"getaddrinfo returned nothing for {host}")


class _GuardedHTTPConnection(HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_create_connection  # http.client sets it per instance


class _GuardedHTTPSConnection(HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_create_connection


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> HTTPResponse:
        return self.do_open(_GuardedHTTPConnection, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> HTTPResponse:
        return self.do_open(_GuardedHTTPSConnection, req, context=self._context)


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        why = _POLICY["guard"].check(newurl)
        if why:
            raise HTTPError(newurl, code, f"redirect to a refused URL ({why}): {newurl[:200]}", headers, fp)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.lvd_started = getattr(req, "lvd_started", time.monotonic())
        return new


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
                return b"".join(parts)
            n += len(block)
            if n > self._max:
                raise ValueError(f"response larger than {self._max} bytes: refused")
            if time.monotonic() > self._deadline:
                raise TimeoutError("download took longer than max_download_seconds: timed out")
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
        if not hasattr(req, "lvd_started"):
            req.lvd_started = time.monotonic()
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
        deadline = getattr(req, "lvd_started", time.monotonic()) + cfg.max_download_seconds
        return _LimitedResponse(resp, cfg.max_download_bytes, deadline)

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
