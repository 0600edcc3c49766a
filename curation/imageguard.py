"""What happens to downloaded bytes before img2dataset resizes them: sniffing, bomb and integrity checks, and
predictable conversion of the image modes img2dataset's OpenCV decoder gets wrong.

img2dataset decodes with ``cv2.IMREAD_UNCHANGED``: EXIF orientation is ignored, 16-bit PNGs stay 16-bit, a JPEG
whose scan data is cut short (even with an end-of-image marker appended) or damaged decodes to a grey-padded image
without complaint (libjpeg only warns), and HTML or SVG bodies all end as the same "Image decoding error". Pillow
ignores libjpeg's warnings too, and neither checks what OpenCV's libpng checks (a PNG's IDAT checksums), so the two
decode paths would disagree. :class:`GuardedResizer` (an img2dataset ``Resizer``) first

- refuses empty bodies, HTML pages, SVG documents and structurally truncated JPEG/PNG files with their own messages;
- reads the header only and refuses images with more than ``max_decode_pixels`` pixels (decompression bombs);
- checks the compressed data of every JPEG and PNG, whichever path decodes it next (:func:`integrity`): a JPEG is
  entropy-decoded by libjpeg-turbo with warnings as errors (``simplejpeg``'s strict mode: a premature end of the
  scan is ``truncated image``, a bad Huffman code or table ``decode error``); a PNG's chunk checksums are verified
  (Pillow skips the IDAT ones), and when a decoder then fails on its zlib stream the stream is inflated to name the
  fault alike for both paths (cut short: ``truncated image``, corrupt: ``decode error``);
- passes plain 8-bit RGB/grey JPEG and PNG files through untouched (the fast path: OpenCV decodes them; a PNG's
  bit depth is read from its header, as Pillow reports 16-bit RGB as mode RGB);
- decodes everything else with Pillow (HEIC too) by the rules every reader of images follows
  (:func:`infra.images.normalize`: first frame of animations, EXIF orientation applied, CMYK/YCbCr -> RGB, palette
  -> RGB, 16-bit -> 8-bit (top byte), 1-bit -> grey, alpha composited on white, img2dataset's own rule), and hands
  img2dataset a lossless PPM/PGM of the result.

A JPEG has no checksum: a flipped bit that keeps the Huffman stream in step changes a coefficient and nothing
else, and no decoder can tell (about 3 in 4 single-bit flips, measured on a photograph); every decode path then
keeps the same image. Grey images stay single-channel; everything else is RGB.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from infra.config.ingest import IngestConfig
from infra.images import normalize, orientation

_PNG = b"\x89PNG\r\n\x1a\n"
_FAILED = (None, None, None, None, None)


def sniff(data: bytes) -> str | None:
    """A refusal message for bytes that are not a usable raster image (None: let the decoder decide)."""
    if not data:
        return "empty response (0 bytes)"
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "not an image: an html document"
    if head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!doctype svg")) and b"<svg" in head):
        return "unsupported format: svg (vector image)"
    if data.startswith(b"\xff\xd8"):
        last_scan = data.rfind(b"\xff\xda")
        if last_scan < 0:
            return "truncated image: jpeg without scan data"
        if data.rfind(b"\xff\xd9") < last_scan:  # the last scan never reaches end-of-image
            return "truncated image: jpeg without end-of-image marker"
    elif data.startswith(_PNG) and data.rfind(b"IEND") < 0:
        return "truncated image: png without IEND chunk"
    return None


def is_plain(img: Image.Image, data: bytes) -> bool:
    """Bytes OpenCV decodes exactly as Pillow would after :func:`normalize`."""
    if img.format not in ("JPEG", "PNG") or img.mode not in ("RGB", "L") or "transparency" in img.info:
        return False
    if getattr(img, "is_animated", False):
        return False
    if img.format == "PNG":  # Pillow opens 16-bit RGB as mode RGB (top bytes); OpenCV would keep 16-bit samples
        if not (data[12:16] == b"IHDR" and data[24] == 8):  # IHDR bit depth
            return False
        if b"eXIf" not in data:  # no EXIF chunk, no orientation (and Pillow would decode the PNG to look for one)
            return True
    return orientation(img) == 1  # OpenCV ignores EXIF orientation (img2dataset decodes with IMREAD_UNCHANGED)


def _simplejpeg() -> Any:
    try:
        import simplejpeg
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise ImportError("ingest checks JPEG data with libjpeg-turbo's strict mode: pip install simplejpeg") from err
    return simplejpeg


def _jpeg(data: bytes) -> str | None:
    """Entropy-decode a JPEG with libjpeg-turbo, every warning an error: None, or why not. At 1/8 scale: every
    coefficient is still decoded (a cut or corrupt scan is found), only the inverse DCT is skipped; about 0.55 ms of
    CPU for a 512x512 photograph, against 0.95 ms for OpenCV's full decode (a full strict decode costs 2.1 ms more,
    so the check does not replace OpenCV's decode)."""
    try:
        _simplejpeg().decode_jpeg(data, colorspace="GRAY", strict=True, min_factor=8, min_width=1, min_height=1)
    except ValueError as err:
        text = str(err)
        kind = "truncated image" if "premature end" in text.lower() else "decode error"
        return f"{kind}: jpeg {text[:200]}"
    return None


def _png_raw_size(ihdr: bytes) -> int:
    """Bytes of filtered scanlines a PNG's header promises (every Adam7 pass for interlaced images)."""
    w, h, depth, colour, _c, _f, interlace = struct.unpack(">IIBBBBB", ihdr[:13])
    bits = depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 0)
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    total = 0
    for x0, y0, dx, dy in passes if interlace else [(0, 0, 1, 1)]:
        pw, ph = (w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy
        if pw > 0 and ph > 0:
            total += ph * (1 + (pw * bits + 7) // 8)
    return total


def _png_chunks(data: bytes) -> tuple[bytes | None, list[memoryview], str | None]:
    """(IHDR, IDAT payloads, None), or a refusal: a chunk cut short, a checksum that does not match, no IEND."""
    view, pos, ihdr, idat = memoryview(data), 8, None, []
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return None, [], "truncated image: png chunk cut short"
        if zlib.crc32(view[pos + 4 : end - 4]) != struct.unpack(">I", data[end - 4 : end])[0]:
            return None, [], f"decode error: png {kind.decode('latin-1')!r} chunk checksum mismatch"
        if kind == b"IHDR":
            ihdr = data[pos + 8 : end - 4]
        elif kind == b"IDAT":
            idat.append(view[pos + 8 : end - 4])
        elif kind == b"IEND":
            return ihdr, idat, None if ihdr is not None and len(ihdr) >= 13 else "decode error: png without header"
        pos = end
    return None, [], "truncated image: png without IEND chunk"


def _png(data: bytes, inflate: bool) -> str | None:
    """Chunk checksums; with ``inflate``, the image data inflated too (in pieces, never held) to the size the header
    promises. OpenCV refuses a corrupt or short zlib stream itself, so for its path the inflate (half the cost of a
    PNG decode) runs only to name the fault once it failed; Pillow fills in the rows of a whole but short stream
    silently, so its path is inflated first. Either way the fault is named alike: ``truncated image`` or ``decode
    error``. Pillow does not verify IDAT checksums, OpenCV's libpng does: checked here for both."""
    ihdr, idat, why = _png_chunks(data)
    if why is not None or not inflate:
        return why
    assert ihdr is not None
    expected, got, d = _png_raw_size(ihdr), 0, zlib.decompressobj()
    try:
        for block in idat:
            pending = bytes(block)
            while pending and got <= expected:
                got += len(d.decompress(pending, 1 << 20))
                pending = d.unconsumed_tail
        got += len(d.flush())
    except zlib.error as err:
        return f"decode error: png image data is corrupt ({err})"
    if got < expected:
        return f"truncated image: png image data stops early ({got} of {expected} bytes)"
    return None


def integrity(data: bytes) -> str | None:
    """A refusal message for a JPEG or PNG whose compressed data is cut short or corrupt (None: intact, or
    another format, which Pillow checks as it decodes)."""
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data.startswith(_PNG):
        return _png(data, inflate=False)
    return None


def explain_failure(data: bytes) -> str | None:
    """Why a PNG that passed :func:`integrity` failed to decode (its zlib stream), in the words both paths use."""
    return _png(data, inflate=True) if data.startswith(_PNG) else None


def prepare(data: bytes, max_pixels: int) -> tuple[bytes | None, str | None]:
    """(bytes for OpenCV, None) or (None, refusal message)."""
    out, why, _ = prepare_scaled(data, max_pixels, None)
    return out, why


def _passes(w: int, h: int, cfg: IngestConfig) -> bool:
    """img2dataset's own checks on a decoded size (its Resizer refuses the image otherwise)."""
    return min(w, h) >= cfg.min_image_size and w * h <= cfg.max_image_area and max(w, h) / min(w, h) <= cfg.max_aspect_ratio


def _draft(img: Image.Image, cfg: IngestConfig) -> tuple[int, int] | None:
    """Set a JPEG to decode at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling) where img2dataset's resize would
    shrink it at least twice as much anyway: the side the resize mode fits stays at or above twice ``image_size``
    (the area filter then makes the last step: within 0.2-0.33 grey levels of img2dataset's resize of the full
    decode; at once ``image_size``, 0.6-1.1), and img2dataset's checks decide on the smaller size as on the full
    one. Returns the full (displayed) size, or None (nothing set: decoded in full). A 12-megapixel JPEG to 256 px,
    decoded at 1/4: the decode 49-82 -> 14 ms of CPU and 36 -> 2.3 MB of pixels; the guarded resize 77-96 -> 36-41
    ms."""
    if img.format != "JPEG" or cfg.resize_mode == "no":
        return None
    turned = orientation(img) in (5, 6, 7, 8)  # shown transposed: img2dataset sees (and records) that size

    def shown(size: tuple[int, int]) -> tuple[int, int]:
        return (size[1], size[0]) if turned else size

    def fits(size: tuple[int, int]) -> bool:
        w, h = shown(size)
        side = min(w, h) if cfg.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
        return side >= 2 * cfg.image_size and _passes(w, h, cfg)

    w, h = shown(img.size)
    side = min(w, h) if cfg.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
    if side < 4 * cfg.image_size or not _passes(w, h, cfg):
        return None
    want = (math.ceil(img.size[0] * 2 * cfg.image_size / side), math.ceil(img.size[1] * 2 * cfg.image_size / side))
    ratio = min(img.size[0] // want[0], img.size[1] // want[1])
    scale = 8 if ratio >= 8 else 4 if ratio >= 4 else 2 if ratio >= 2 else 1  # as Pillow's JPEG draft picks it
    if scale == 1 or not fits((-(-img.size[0] // scale), -(-img.size[1] // scale))):
        return None
    img.draft(img.mode, want)
    return w, h


def _resized_as_from(img: Image.Image, full: tuple[int, int], cfg: IngestConfig) -> Image.Image:
    """``img`` (a smaller decode) at the size img2dataset's resize gives the full ``(width, height)``:
    albumentations' Smallest/LongestMaxSize, ``round(side * image_size / fitted side)``, with OpenCV's area filter
    (img2dataset's downscale interpolation). img2dataset then finds the fitted side at ``image_size`` already."""
    import cv2

    w, h = full
    scale = cfg.image_size / (min(w, h) if cfg.resize_mode in ("keep_ratio", "center_crop") else max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if img.size == size:
        return img
    return Image.fromarray(cv2.resize(np.asarray(img), size, interpolation=cv2.INTER_AREA), img.mode)


def prepare_scaled(data: bytes, max_pixels: int,
                   cfg: IngestConfig | None) -> tuple[bytes | None, str | None, tuple[int, int] | None]:  # fmt: skip
    """:func:`prepare`; with ``cfg``, a JPEG that img2dataset would shrink at least fourfold is decoded smaller
    (:func:`_draft`) and handed over as a PPM at img2dataset's size, with its full size (else None) for the record."""
    if why := sniff(data):
        return None, why, None
    full = None
    try:
        with Image.open(io.BytesIO(data)) as img:  # header only so far
            w, h = img.size
            if w * h > max_pixels:
                return None, f"too many pixels to decode ({w}x{h})", None
            if why := integrity(data):
                return None, why, None
            full = _draft(img, cfg) if cfg is not None else None
            if full is None and is_plain(img, data):
                return data, None, None  # OpenCV refuses a short or corrupt zlib stream itself (explain_failure)
            if why := explain_failure(data):  # Pillow fills in the rows of a short zlib stream without a word
                return None, why, None
            out = normalize(img)
            if full is not None:  # img2dataset's size from the full one, so that its own resize changes nothing
                out = _resized_as_from(out, full, cfg)
    except Image.DecompressionBombError as err:
        return None, f"too many pixels to decode ({err})", None
    except UnidentifiedImageError:
        return None, "decode error: not a known image format", None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:  # Pillow's ways of saying corrupt
        return None, explain_failure(data) or f"decode error: {err}", None
    buf = io.BytesIO()
    out.save(buf, "PPM")  # lossless and nearly free to write and read (P5 for L, P6 for RGB)
    return buf.getvalue(), None, full


def guarded_resizer(cfg: IngestConfig) -> Any:
    """img2dataset's Resizer behind :func:`prepare`.

    img2dataset silences OpenCV by dup2-ing /dev/null onto file descriptors 1 and 2 around every decode. That is
    not thread-safe: with its own download threads (or two shards in one process) a thread can save the other's
    /dev/null as "the original" and restore it, and the whole process loses stdout and stderr for good (found by
    bench/ingest.py printing nothing). The redirection is switched off here; sniffing already refuses the inputs
    OpenCV would complain about.
    """
    import img2dataset.resizer
    from img2dataset.resizer import Resizer

    _simplejpeg()  # up front: a missing dependency stops the stage before any download

    img2dataset.resizer.SuppressStdoutStderr = contextlib.nullcontext

    class GuardedResizer(Resizer):  # type: ignore[misc]
        token = cfg.model_dump_json()  # resizers of equal configurations give equal results

        def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
            if blurring_bbox_list is None and getattr(img_stream, "token", None) == self.token:
                return img_stream.result  # computed in its download thread
            img_stream.seek(0)
            return self.compute(img_stream.read(), blurring_bbox_list)

        def compute(self, raw: bytes, blurring_bbox_list: Any = None) -> tuple:
            data, why, full = prepare_scaled(raw, cfg.max_decode_pixels, cfg)
            if why is not None:
                return (*_FAILED, why)
            result = super().__call__(io.BytesIO(data), blurring_bbox_list)
            if result[-1] == "Image decoding error" and (why := explain_failure(raw)):  # OpenCV refused it
                return (*_FAILED, why)
            if full is not None and result[-1] is None:  # decoded smaller: the record keeps the image's own size
                return (*result[:3], *full, None)
            return result

    return GuardedResizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_quality=cfg.encode_quality,
        encode_format=cfg.encode_format,
        min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area,
        max_aspect_ratio=cfg.max_aspect_ratio,
    )


# Decoding in the download threads. img2dataset downloads a shard's URLs on its threads but decodes, checks and
# resizes each image in the shard's one loop, so a shard of local photographs (no network wait: decoding is the work)
# used one core whatever the machine. While :func:`resizing_in_download_threads` is active, each download thread
# computes its image's result right after the download (the same function, on the same bytes: the same result) and
# hands it over with the image; the loop takes it instead of computing it (were img2dataset given face boxes to blur,
# which only the loop has, it would compute it there). At most one decode per CPU runs at once across the process
# (infra.cpus), so memory holds that many decoded photographs, not one per download thread.
_RESIZING: dict[str, Any] = {"resizers": {}, "original": None, "slots": None}
_RESIZING_LOCK = threading.Lock()


class PreparedStream(io.BytesIO):
    """Downloaded bytes with the result of the resizer whose configuration is ``token``."""

    token: str | None = None
    result: tuple | None = None


def _download_and_resize(row: Any, **kw: Any) -> tuple:
    key, stream, err = _RESIZING["original"](row, **kw)
    resizers = list(_RESIZING["resizers"].values())
    if stream is None or len({r.token for r in resizers}) != 1:  # (shards of two configurations: the loop decodes)
        return key, stream, err
    raw = stream.getvalue()
    try:
        with _RESIZING["slots"]:
            result = resizers[0].compute(raw)
    except Exception:  # the loop computes it again and meets the error where it always has
        return key, stream, err
    out = PreparedStream(raw)
    out.token, out.result = resizers[0].token, result
    return key, out, err


@contextlib.contextmanager
def resizing_in_download_threads(resizer: Any) -> Iterator[None]:
    """Within: img2dataset's downloads in this process resize in their own threads with ``resizer`` (concurrent
    shards share it: img2dataset's download function is module-wide, as the opener is)."""
    import img2dataset.downloader as downloader

    from infra.cpus import cpus

    with _RESIZING_LOCK:
        if not _RESIZING["resizers"]:
            _RESIZING["original"] = downloader.download_image_with_retry
            _RESIZING["slots"] = threading.BoundedSemaphore(cpus())
            downloader.download_image_with_retry = _download_and_resize
        _RESIZING["resizers"][id(resizer)] = resizer
    try:
        yield
    finally:
        with _RESIZING_LOCK:
            del _RESIZING["resizers"][id(resizer)]
            if not _RESIZING["resizers"]:
                downloader.download_image_with_retry = _RESIZING["original"]
