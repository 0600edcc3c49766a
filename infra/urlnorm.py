"""URL normalisation the way browsers do it (the WHATWG URL Standard's basic parser, without a base URL).

:func:`normalize_url` turns what a crawl list holds (surrounding whitespace, a raw UTF-8 path, an internationalised
host, ``HTTP://Example.COM:80/a b``, an IPv4 address as ``0x7f.1``) into the one ASCII string a browser would
request (``http://example.com/a%20b``, ``http://127.0.0.1/``), and raises :class:`UrlNormalizationError` for what a
browser would refuse to load (no scheme, a bad port, a forbidden character in the host, an invalid IP literal).
Ingestion fetches the normalised URL and keeps the original string in lineage; lineage look-ups compare
normalised forms, so a URL matches however it was spelled.

For the special schemes (http, https, ws, wss, ftp, file):

- leading and trailing C0 controls and spaces are stripped, tabs and newlines removed anywhere; the scheme and host
  are lower-cased; ``\\`` counts as ``/``, and any number of slashes may follow ``http:``;
- userinfo, path, query and fragment are UTF-8 percent-encoded with the standard's percent-encode sets; existing
  ``%XX`` escapes are kept as written; ``.`` and ``..`` segments (also as ``%2e``) are resolved;
- the host is percent-decoded, then mapped by UTS #46 (non-transitional: ``ß`` stays ``ß``) and Punycode-encoded
  label by label (IDNA, through the ``idna`` package's UTS #46 table); a host that ends in a number is an IPv4
  address in any of its spellings (decimal, octal, hex, fewer than four parts) and is written dotted-decimal; IPv6
  literals are written in their shortest form (an IPv4-mapped one in hex); zone ids (``%25eth0``) are refused;
- a default port (80 for http, 443 for https) is dropped, a port above 65535 is refused.

Other schemes are only recognised (scheme lower-cased, the rest percent-encoded with the C0 control set); one with
whitespace or control characters inside is refused as malformed, since nothing fetches it anyway. Stdlib plus ``idna`` (a dependency of httpx,
requests and anyio) for the UTS #46 mapping table; nothing here touches the network.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import idna
import idna.core

SPECIAL_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21, "file": None}
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*:")
_C0 = {chr(c) for c in range(0x20)}
_STRIP = "".join(sorted(_C0)) + " "
_SURROGATE = re.compile("[\ud800-\udfff]")
_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]|\s")
# The standard's percent-encode sets (code points above U+007E are always encoded).
C0_SET = frozenset(_C0)
FRAGMENT_SET = frozenset(_C0 | set(' "<>`'))
QUERY_SET = frozenset(_C0 | set(' "#<>'))
SPECIAL_QUERY_SET = frozenset(QUERY_SET | {"'"})
PATH_SET = frozenset(QUERY_SET | set("?^`{}"))
USERINFO_SET = frozenset(PATH_SET | set("/:;=@[\\]|"))
# Code points a host may not contain (the forbidden domain code points), checked after IDNA mapping.
FORBIDDEN_DOMAIN = frozenset(_C0 | set(" #/:<>?@[\\]^|%\x7f"))


def _printable_members(chars: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted(c for c in chars if " " <= c <= "~"))


# The printable members of each set: with str.isascii/isprintable (C speed) they tell a string needs no encoding.
_PRINTABLE = {s: _printable_members(s) for s in (C0_SET, FRAGMENT_SET, QUERY_SET, SPECIAL_QUERY_SET, PATH_SET,
                                                 USERINFO_SET, FORBIDDEN_DOMAIN)}  # fmt: skip


def _clean(text: str, keep_out: frozenset[str]) -> bool:
    """No character of ``text`` is in ``keep_out`` or outside printable ASCII."""
    return text.isascii() and text.isprintable() and not any(c in text for c in _PRINTABLE[keep_out])


class UrlNormalizationError(ValueError):
    """The text is not a URL a browser would load (ingestion records it as ``url_malformed``)."""


@dataclass(frozen=True)
class Url:
    """A parsed, normalised URL; ``str(url)`` is its serialisation (what :func:`normalize_url` returns)."""

    scheme: str
    username: str = ""
    password: str = ""
    host: str | None = None  # None for non-special schemes (opaque rest)
    port: int | None = None
    path: str = ""
    query: str | None = None
    fragment: str | None = None

    @property
    def special(self) -> bool:
        return self.scheme in SPECIAL_PORTS

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.password)

    def without_credentials(self) -> Url:
        return Url(self.scheme, "", "", self.host, self.port, self.path, self.query, self.fragment)

    def __str__(self) -> str:
        if not self.special:
            return f"{self.scheme}:{self.path}"
        out = f"{self.scheme}://"
        if self.has_credentials:
            out += self.username + (f":{self.password}" if self.password else "") + "@"
        out += self.host or ""
        if self.port is not None:
            out += f":{self.port}"
        out += self.path
        if self.query is not None:
            out += "?" + self.query
        if self.fragment is not None:
            out += "#" + self.fragment
        return out


def normalize_url(text: str) -> str:
    """The URL as a browser would request it (see the module docstring); raises :class:`UrlNormalizationError`."""
    return str(parse_url(text))


def parse_url(text: str) -> Url:
    if not isinstance(text, str):
        raise UrlNormalizationError(f"not a string: {type(text).__name__}")
    text = _scalar_values(text).strip(_STRIP)
    text = text.replace("\t", "").replace("\n", "").replace("\r", "")
    m = _SCHEME.match(text)
    if not m:
        raise UrlNormalizationError(f"no scheme: {text[:100]!r}")
    scheme, rest = m.group()[:-1].lower(), text[m.end() :]
    if scheme not in SPECIAL_PORTS:
        if _SPACE_OR_CONTROL.search(rest):
            raise UrlNormalizationError(f"whitespace or control characters in a {scheme}: URL")
        return Url(scheme, path=_encode(rest, C0_SET) or "")
    rest, fragment = _cut(rest, "#")
    rest, query = _cut(rest, "?")
    rest = rest.replace("\\", "/")  # in a special URL's authority and path only
    if scheme == "file":
        return _parse_file(rest, query, fragment)
    rest = rest.lstrip("/")
    authority, slash, path = rest.partition("/")
    user, password, hostport = _split_userinfo(authority)
    host, port = _split_port(hostport, scheme)
    return Url(scheme, user, password, parse_host(host), port, normalize_path(slash + path),
               _encode(query, SPECIAL_QUERY_SET), _encode(fragment, FRAGMENT_SET))  # fmt: skip


def _scalar_values(text: str) -> str:
    """Lone surrogates (not Unicode scalar values) become U+FFFD, as a browser's string conversion does."""
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return _SURROGATE.sub("\ufffd", text)


def _cut(text: str, sep: str) -> tuple[str, str | None]:
    head, found, tail = text.partition(sep)
    return head, (tail if found else None)


def _encode(text: str | None, keep_out: frozenset[str]) -> str | None:
    if text is None:
        return None
    if _clean(text, keep_out):
        return text
    return "".join(c if c <= "~" and c not in keep_out else _pct(c) for c in text)  # "~" is U+007E


def _pct(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode("utf-8"))


def _split_userinfo(authority: str) -> tuple[str, str, str]:
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        return "", "", authority
    if not hostport:
        raise UrlNormalizationError("credentials without a host")
    user, _colon, password = userinfo.partition(":")
    return _encode(user, USERINFO_SET) or "", _encode(password, USERINFO_SET) or "", hostport


def _split_port(hostport: str, scheme: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        end = hostport.find("]")
        host, after = (hostport[: end + 1], hostport[end + 1 :]) if end >= 0 else (hostport, "")
        if after and not after.startswith(":"):
            raise UrlNormalizationError(f"characters after an IPv6 literal: {hostport[:100]!r}")
        port_text = after[1:] if after else None
    else:
        host, colon, port_text = hostport.partition(":")
        port_text = port_text if colon else None
    if not port_text:
        return host, None
    if not port_text.isascii() or not port_text.isdigit():
        raise UrlNormalizationError(f"not a port: {port_text[:20]!r}")
    port = int(port_text)
    if port > 65535:
        raise UrlNormalizationError(f"port out of range: {port}")
    return host, (None if port == SPECIAL_PORTS[scheme] else port)


def _parse_file(rest: str, query: str | None, fragment: str | None) -> Url:
    host = ""
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        rest = slash + path
        host = "" if not host else parse_host(host)
        if host == "localhost":
            host = ""
    return Url("file", host=host, path=normalize_path(rest or "/"),
               query=_encode(query, SPECIAL_QUERY_SET), fragment=_encode(fragment, FRAGMENT_SET))  # fmt: skip


_SINGLE_DOT = frozenset({".", "%2e"})
_DOUBLE_DOT = frozenset({"..", ".%2e", "%2e.", "%2e%2e"})


def normalize_path(path: str) -> str:
    """A special URL's path: percent-encoded, ``.`` and ``..`` segments resolved, always starting with ``/``."""
    out: list[str] = []
    segments = path.split("/")[1:] if path.startswith("/") else path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        low = seg.lower()
        if low in _DOUBLE_DOT:
            if out:
                out.pop()
            if last:
                out.append("")
        elif low in _SINGLE_DOT:
            if last:
                out.append("")
        else:
            out.append(_encode(seg, PATH_SET) or "")
    return "/" + "/".join(out)


# --- hosts ---------------------------------------------------------------------------------------------------


def parse_host(text: str) -> str:
    """A special URL's host: an IPv6 literal in brackets, an IPv4 address, or an ASCII domain (UTS #46 + Punycode)."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise UrlNormalizationError(f"unclosed IPv6 literal: {text[:100]!r}")
        return "[" + serialize_ipv6(parse_ipv6(text[1:-1])) + "]"
    if not text:
        raise UrlNormalizationError("empty host")
    raw = unquote_to_bytes(text) if "%" in text else text.encode("utf-8")
    domain = domain_to_ascii(raw.decode("utf-8", "replace"))
    if not _clean(domain, FORBIDDEN_DOMAIN):  # ASCII by now: a control or forbidden character is left
        raise UrlNormalizationError(f"forbidden character in host: {domain[:100]!r}")
    if ends_in_a_number(domain):
        return str(ipaddress.IPv4Address(parse_ipv4(domain)))
    return domain


def domain_to_ascii(domain: str) -> str:
    lower = domain.lower()
    if domain.isascii() and "xn--" not in lower:
        return lower
    try:
        mapped = unicodedata.normalize("NFC", idna.uts46_remap(domain, std3_rules=False, transitional=False))
    except idna.IDNAError as err:
        raise UrlNormalizationError(f"host is not a valid internationalised domain: {err}") from err
    return ".".join(_label_to_ascii(label) for label in mapped.split("."))


def _label_to_ascii(label: str) -> str:
    if label.startswith("xn--"):
        try:
            decoded = label[4:].encode("ascii").decode("punycode")
        except (UnicodeError, ValueError) as err:
            raise UrlNormalizationError(f"invalid Punycode label: {label[:70]!r}") from err
        if not decoded or decoded.isascii():
            raise UrlNormalizationError(f"invalid Punycode label: {label[:70]!r}")
        _check_label(decoded)
        return label
    if label.isascii():
        return label
    _check_label(label)
    return "xn--" + label.encode("punycode").decode("ascii")


def _check_label(label: str) -> None:
    """UTS #46 validity (CheckHyphens off, CheckJoiners and CheckBidi on, as the URL Standard sets them)."""
    if unicodedata.normalize("NFC", label) != label:
        raise UrlNormalizationError(f"label not in NFC: {label[:70]!r}")
    if unicodedata.category(label[0])[0] == "M":
        raise UrlNormalizationError(f"label begins with a combining mark: {label[:70]!r}")
    try:
        valid = idna.uts46_remap(label, std3_rules=False, transitional=False) == label and all(
            idna.core.valid_contextj(label, i) for i, c in enumerate(label) if c in "\u200c\u200d"
        )
        idna.core.check_bidi(label)
    except idna.IDNAError as err:
        raise UrlNormalizationError(f"invalid internationalised label {label[:70]!r}: {err}") from err
    if not valid:
        raise UrlNormalizationError(f"invalid internationalised label: {label[:70]!r}")


def ends_in_a_number(domain: str) -> bool:
    parts = domain.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    last = parts[-1]
    if last and last.isascii() and last.isdigit():
        return True
    return _ipv4_number(last) is not None


def _ipv4_number(part: str) -> int | None:
    if not part:
        return None
    radix = 10
    if part[:2] in ("0x", "0X"):
        part, radix = part[2:], 16
    elif len(part) > 1 and part[0] == "0":
        part, radix = part[1:], 8
    if not part:
        return 0
    digits = "0123456789abcdefABCDEF"[: 22 if radix == 16 else radix]
    if not all(c in digits for c in part):
        return None
    return int(part, radix)


def parse_ipv4(domain: str) -> int:
    """The URL Standard's IPv4 parser: 1-4 dot-separated numbers, each decimal, octal (``0``) or hex (``0x``)."""
    parts = domain.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if len(parts) > 4:
        raise UrlNormalizationError(f"IPv4 address with more than four parts: {domain[:100]!r}")
    numbers = [_ipv4_number(p) for p in parts]
    if any(n is None for n in numbers):
        raise UrlNormalizationError(f"host ends in a number but is not an IPv4 address: {domain[:100]!r}")
    nums = [int(n) for n in numbers if n is not None]
    if any(n > 255 for n in nums[:-1]) or nums[-1] >= 256 ** (5 - len(nums)):
        raise UrlNormalizationError(f"IPv4 address out of range: {domain[:100]!r}")
    value = nums[-1]
    for i, n in enumerate(nums[:-1]):
        value += n * 256 ** (3 - i)
    return value


def parse_ipv6(text: str) -> int:
    if "%" in text or not text or not all(c in "0123456789abcdefABCDEF:." for c in text):
        raise UrlNormalizationError(f"invalid IPv6 literal (zone ids are not allowed in URLs): {text[:100]!r}")
    try:
        return int(ipaddress.IPv6Address(text))
    except ValueError as err:
        raise UrlNormalizationError(f"invalid IPv6 literal: {text[:100]!r}") from err


def serialize_ipv6(value: int) -> str:
    """The standard's form: lower-case hex pieces, the first longest run of two or more zero pieces as ``::``."""
    pieces = [(value >> (16 * (7 - i))) & 0xFFFF for i in range(8)]
    best, best_len, i = -1, 1, 0
    while i < 8:
        j = i
        while j < 8 and pieces[j] == 0:
            j += 1
        if j - i > best_len:
            best, best_len = i, j - i
        i = j + 1 if j == i else j
    if best < 0:
        return ":".join(f"{p:x}" for p in pieces)
    head = ":".join(f"{p:x}" for p in pieces[:best])
    tail = ":".join(f"{p:x}" for p in pieces[best + best_len :])
    return f"{head}::{tail}"
