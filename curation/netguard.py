"""What may be fetched: the URL guard (normalisation, credentials, destinations, local files).

Two checks keep the crawler away from private destinations (cloud metadata endpoints above all):

1. :class:`UrlGuard` before download, on the URL alone (no DNS). The URL is normalised first, as a browser would
   (:func:`infra.urlnorm.normalize_url`: UTF-8 percent-encoding, UTS #46 hosts, IPv4 addresses in any spelling
   written dotted-decimal), so the guard and the fetch see the same destination; a URL that cannot be normalised is
   ``url_malformed``. Then: the scheme (http/https, or file under ``ingest.local_roots``), credentials in the URL
   (``ingest.url_credentials``: refused as ``url_credentials``, or stripped), a host that is not a DNS name
   (``url_malformed``: only validated host names are ever resolved), and literal addresses
   (``169.254.169.254``, ``0251.0376.0251.0376``, ``2130706433``, ``[::1]``, ``[::ffff:169.254.169.254]``).
2. The opener (:mod:`curation.opener`), right before every connection (redirects included): the host name is
   resolved, every address is checked, and only a checked address is connected to, so a public name that resolves to
   a private address (or changes its answer between check and connect) is refused without a packet sent.

Local files (a folder as the pool, ``ingest.local_roots``): ``file://`` URLs are read only when their real path
lies under a root, checked by the guard and again when the opener opens the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from infra.config.ingest import IngestConfig
from infra.urlnorm import Url, UrlNormalizationError, ends_in_a_number, parse_url

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance-metadata endpoints: refused even with allow_private, unless listed exactly in allow_hosts.
METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "169.254.169.123", "100.100.100.200", "fd00:ec2::254")
)


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


def file_url_path(path: str) -> Path:
    """The file a ``file://`` URL's (percent-encoded) path names. The escapes are bytes (RFC 8089, as `Path.as_uri`
    writes them), decoded as the file system decodes names: a name that is not UTF-8 (`caf\xe9.jpg` from an old
    archive, `%E9` in its URL) names its file, where `url2pathname` would read it as `caf\ufffd.jpg`, a file that
    does not exist."""
    return Path(os.fsdecode(unquote_to_bytes(path)))


def local_file(url: str, roots: Sequence[Path]) -> Path:
    """The real path (symbolic links resolved) that a ``file://`` URL names, if it lies under one of ``roots``."""
    parts = urlsplit(url.strip())
    if (parts.hostname or "") not in ("", "localhost") or parts.query or parts.fragment:
        raise LocalFileRefused("url_malformed", f"file URL with a host, query or fragment: {url[:200]}")
    path = file_url_path(parts.path)
    if not path.is_absolute():
        raise LocalFileRefused("url_malformed", f"file URL without an absolute path: {url[:200]}")
    real = Path(os.path.realpath(path))
    for root in roots:
        top = Path(os.path.realpath(root))
        if top in real.parents:
            return real
    raise LocalFileRefused("path_outside_roots", f"{path} (real path {real}) is outside ingest.local_roots")


# A host name that may be resolved: DNS labels of letters, digits, hyphens and underscores (what resolvers accept).
_DNS_NAME = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}\.?")


def is_dns_name(host: str) -> bool:
    return len(host) <= 254 and _DNS_NAME.fullmatch(host) is not None


def validated_host(host: str) -> str | None:
    """The host to resolve or connect to, if it may be (an IP literal without zone id, brackets removed; or a
    DNS name whose last label is not a number, i.e. as normalisation writes names), else None."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "%" not in bare and _is_ip(bare):
        return bare
    return host if is_dns_name(host) and not ends_in_a_number(host) else None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Verdict:
    """The guard's decision on one URL: ``reason`` (None: fetch it) and the URL to fetch (normalised; credentials
    removed when ``ingest.url_credentials`` is ``strip``, then ``stripped`` is True)."""

    reason: str | None
    url: str | None = None
    stripped: bool = False


@dataclass
class UrlGuard:
    """Refuse what must never be fetched: malformed URLs, bad schemes, credentials (by policy), hosts that are not
    DNS names, literal private destinations, local files outside ``ingest.local_roots``."""

    cfg: IngestConfig

    def __post_init__(self) -> None:
        self.policy = DestinationPolicy.from_config(self.cfg)
        for root in self.cfg.local_roots:
            if not Path(root).is_dir():
                raise FileNotFoundError(f"ingest.local_roots: {root} is not a folder")

    def check(self, url: str) -> str | None:
        """None if the URL may be fetched, else the reason code it may not."""
        return self.decide(url).reason

    def decide(self, url: object) -> Verdict:
        try:
            parts = parse_url(url)  # type: ignore[arg-type]  (a null list cell arrives as None)
        except UrlNormalizationError:
            return Verdict("url_malformed")
        if parts.scheme == "file" and self.cfg.local_roots:
            try:
                local_file(str(parts), self.cfg.local_roots)
            except LocalFileRefused as err:
                return Verdict(err.reason)
            return Verdict(None, str(parts))
        if parts.scheme not in ("http", "https"):
            return Verdict("url_scheme")
        stripped = False
        if parts.has_credentials:
            if self.cfg.url_credentials == "refuse":
                return Verdict("url_credentials")
            parts, stripped = parts.without_credentials(), True
        return self._destination(parts, stripped)

    def _destination(self, parts: Url, stripped: bool) -> Verdict:
        host = validated_host(parts.host or "")
        if host is None:
            return Verdict("url_malformed")  # e.g. "a!b.com": no resolver would look it up; never sent to one
        addr = ipaddress.ip_address(host) if _is_ip(host) else None
        if addr is not None and self.policy.refusal(addr, host):
            return Verdict("url_private")
        return Verdict(None, str(parts), stripped)
