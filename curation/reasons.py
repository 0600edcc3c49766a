"""Every reason an ingest row can be dropped for: its class, the step that decides it, and what it means.

Classes:

- ``transient``: the cause may go away by itself (timeouts, 429, 5xx, resets, DNS); ``lvd retry-failed`` retries
  these by default;
- ``permanent``: the input itself is bad (a malformed URL, a 404, a truncated image); retrying the same bytes gives
  the same answer, but a download failure may be retried on request (``--reason http_404``);
- ``policy``: refused by this run's configuration or by the guard's rules (a private destination, credentials,
  robots opt-out, size limits, duplicates); a retry under the same config decides the same, so it is never retried.

Steps: ``list`` (reading the URL list), ``guard`` (before any download), ``download``, ``decode`` (the bytes that
arrived), ``dedup`` (after download). Reasons decided at the list, guard and dedup steps are never retried either.
The same table, in the same order, is in ``docs/ingest.md``; ``tests/curation/test_reasons.py`` checks both ways
that every reason is produced by a test and that nothing else is produced.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

Class = Literal["transient", "permanent", "policy"]
Step = Literal["list", "guard", "download", "decode", "dedup"]


@dataclass(frozen=True)
class Reason:
    name: str  # ``http_*`` stands for every other HTTP status code
    cls: Class
    step: Step
    meaning: str


REASONS: tuple[Reason, ...] = (
    Reason("list_row_malformed", "permanent", "list", "a CSV or JSONL line of the URL list that does not parse"),
    Reason("url_malformed", "permanent", "guard",
           "the URL cannot be normalised (no scheme, bad port, forbidden host character, invalid IP literal) or its "
           "host is not a DNS name; also an empty or null URL"),
    Reason("url_scheme", "policy", "guard", "not http or https (file: only under ingest.local_roots)"),
    Reason("url_credentials", "policy", "guard", "user:password@ in the URL, with ingest.url_credentials: refuse"),
    Reason("url_private", "policy", "guard",
           "a private, loopback, link-local, reserved or cloud-metadata destination: a literal address, or what the "
           "host resolved to right before connecting"),
    Reason("path_outside_roots", "policy", "guard", "a file: URL whose real path is outside ingest.local_roots"),
    Reason("url_duplicate", "policy", "guard", "the same normalised URL as an earlier row"),
    Reason("face_boxes_malformed", "permanent", "guard", "the row's face boxes cannot be read"),
    Reason("file_missing", "permanent", "download", "a file: URL whose file does not exist (or is a folder)"),
    Reason("file_unreadable", "permanent", "download", "a file: URL whose file may not be read"),
    Reason("redirect_refused", "policy", "download",
           "a redirect to a URL the guard refuses (private, credentials, another scheme: file:, data:, javascript:)"),
    Reason("redirect_malformed", "permanent", "download", "a redirect to a location that cannot be normalised"),
    Reason("redirect_loop", "permanent", "download", "a redirect cycle, or more than 10 redirects"),
    Reason("robots_disallowed", "policy", "download", "an X-Robots-Tag opt-out (ingest.disallowed_header_directives)"),
    Reason("content_type", "policy", "download", "a Content-Type that is not an image (ingest.accept_content_types)"),
    Reason("too_large", "policy", "download", "a body over ingest.max_download_bytes"),
    Reason("timeout", "transient", "download",
           "ingest.max_download_seconds passed (resolution, connect, TLS, headers, redirects and body together) or "
           "one socket operation took longer than ingest.timeout"),
    Reason("dns_error", "transient", "download", "the host name did not resolve"),
    Reason("connection_refused", "transient", "download", "nothing listens at the destination"),
    Reason("connection_reset", "transient", "download", "the server reset the connection"),
    Reason("connection_closed", "transient", "download",
           "the server closed the connection before a whole answer (no status line, a body shorter than its "
           "Content-Length)"),
    Reason("tls_error", "permanent", "download", "the TLS handshake failed (certificate, protocol)"),
    Reason("http_408", "transient", "download", "HTTP 408 Request Timeout"),
    Reason("http_429", "transient", "download", "HTTP 429 Too Many Requests (a Retry-After over ingest.retry_after_max)"),
    Reason("http_500", "transient", "download", "HTTP 500 Internal Server Error"),
    Reason("http_502", "transient", "download", "HTTP 502 Bad Gateway"),
    Reason("http_503", "transient", "download", "HTTP 503 Service Unavailable"),
    Reason("http_504", "transient", "download", "HTTP 504 Gateway Timeout"),
    Reason("http_*", "permanent", "download", "any other HTTP error status (http_404, http_403, http_410, ...)"),
    Reason("download_error", "transient", "download", "any other failure of the download (the message is kept)"),
    Reason("lost_by_downloader", "transient", "download", "img2dataset returned no record for the row"),
    Reason("empty_response", "permanent", "decode", "a body of 0 bytes"),
    Reason("not_an_image", "permanent", "decode", "an HTML page"),
    Reason("unsupported_format", "permanent", "decode", "an SVG (vector) image"),
    Reason("truncated_image", "permanent", "decode",
           "a JPEG or PNG whose compressed data stops early (with or without an end marker appended)"),
    Reason("decode_error", "permanent", "decode",
           "corrupt image data: a bad Huffman code or table, a bad PNG chunk checksum or zlib stream, an unknown format"),
    Reason("decompression_bomb", "policy", "decode", "more pixels than ingest.max_decode_pixels (read from the header)"),
    Reason("image_too_small", "policy", "decode", "a side under ingest.min_image_size"),
    Reason("image_too_large", "policy", "decode", "an area over ingest.max_image_area"),
    Reason("aspect_ratio_too_large", "policy", "decode", "an aspect ratio over ingest.max_aspect_ratio"),
    Reason("exact_duplicate", "policy", "dedup", "the same bytes as an earlier row's image (ingest.exact_dedup)"),
    Reason("phash_duplicate", "policy", "dedup",
           "a perceptual hash within ingest.phash_max_distance bits of an earlier kept image's"),
)  # fmt: skip
BY_NAME = {r.name: r for r in REASONS}


def reason(name: str) -> Reason:
    """The table entry of ``name`` (``http_<code>`` falls back to ``http_*``); KeyError for a reason not in it."""
    if name in BY_NAME:
        return BY_NAME[name]
    if name.startswith("http_") and name[5:].isdigit() and len(name) == 8:
        return BY_NAME["http_*"]
    raise KeyError(f"ingest reason {name!r} is not in curation/reasons.py's table")


def retryable(name: str) -> bool:
    """Whether ``lvd retry-failed`` may fetch a row that ended with ``name`` again (on request, if not transient).
    A reason an older version recorded and the table no longer has is a download failure: retryable."""
    if name not in BY_NAME and not name.startswith("http_"):
        return True
    r = reason(name)
    return r.cls != "policy" and r.step in ("download", "decode")


TRANSIENT = tuple(r.name for r in REASONS if r.cls == "transient")


def not_retryable_matches(patterns: list[str], before_download: bool = False) -> list[str]:
    """The patterns that name a reason retry-failed may not retry (shell patterns, ``http_5*``); with
    ``before_download``, only those naming a reason decided without downloading."""
    names = [r.name for r in REASONS if (r.step in ("list", "guard", "dedup") if before_download else not retryable(r.name))]
    return [p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)]
