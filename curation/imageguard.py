"""What happens to downloaded bytes before img2dataset resizes them: sniffing, bomb and truncation checks, and
predictable conversion of the image modes img2dataset's OpenCV decoder gets wrong.

img2dataset decodes with ``cv2.IMREAD_UNCHANGED``: EXIF orientation is ignored, 16-bit PNGs stay 16-bit, a
truncated JPEG decodes to a grey-padded image without complaint, and HTML or SVG bodies all end as the same
"Image decoding error". :class:`GuardedResizer` (an img2dataset ``Resizer``) first

- refuses empty bodies, HTML pages, SVG documents and truncated JPEG/PNG files with their own messages;
- reads the header only and refuses images with more than ``max_decode_pixels`` pixels (decompression bombs);
- passes plain 8-bit RGB/grey JPEG and PNG files through untouched (the fast path: no second decode; a PNG's
  bit depth is read from its header, as Pillow reports 16-bit RGB as mode RGB);
- decodes everything else with Pillow: first frame of animations, EXIF orientation applied, CMYK/YCbCr -> RGB,
  palette -> RGB, 16-bit -> 8-bit (top byte), 1-bit -> grey, alpha composited on white (img2dataset's own rule),
  and hands img2dataset a lossless PPM/PGM of the result.

Grey images stay single-channel; everything else is RGB.
"""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from infra.config.ingest import IngestConfig

_PNG = b"\x89PNG\r\n\x1a\n"
_ORIENTATION = 0x0112
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
    elif data.startswith(_PNG):
        if data.rfind(b"IEND") < 0:
            return "truncated image: png without IEND chunk"
        return png_damage(data)
    return None


def png_damage(data: bytes) -> str | None:
    """A refusal for a PNG with a chunk that fails its CRC. Pillow refuses those before the image data when it reads
    the header; libpng inside OpenCV refuses a damaged IDAT (or warns of a damaged chunk after it), but only after
    printing `libpng error: ...` on the process's stderr, outside the ledger (and silencing that output is not
    thread-safe: see `guarded_resizer`). Costs a CRC-32 over the file (~0.3 ms per MB)."""
    pos = len(_PNG)
    while pos + 12 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data) or kind == b"IEND":
            return None  # (a cut file is refused above; what follows IEND is never decoded)
        if zlib.crc32(data[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return f"decode error: png chunk {kind.decode('latin-1')} fails its CRC (damaged data)"
        pos = end
    return None


def _on_white(img: Image.Image, mode: str) -> Image.Image:
    rgba = img.convert("RGBA")
    out = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return out.convert(mode)


def normalize(img: Image.Image) -> Image.Image:
    """First frame, EXIF orientation, and an 8-bit L or RGB image by fixed rules."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), "L")
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if mode in ("LA", "La"):
        return _on_white(img, "L")
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        return _on_white(img, "RGB")
    if mode == "RGB" and "transparency" in img.info:
        return _on_white(img, "RGB")
    if mode in ("1", "L"):
        return img.convert("L")
    return img.convert("RGB")


def _is_plain(img: Image.Image, data: bytes) -> bool:
    """Bytes OpenCV decodes exactly as Pillow would after :func:`normalize`."""
    if img.format not in ("JPEG", "PNG") or img.mode not in ("RGB", "L") or "transparency" in img.info:
        return False
    if getattr(img, "is_animated", False):
        return False
    if img.format == "PNG":  # Pillow opens 16-bit RGB as mode RGB (top bytes); OpenCV would keep 16-bit samples
        return data[12:16] == b"IHDR" and data[24] == 8  # IHDR bit depth
    return img.getexif().get(_ORIENTATION, 1) == 1


def prepare(data: bytes, max_pixels: int) -> tuple[bytes | None, str | None]:
    """(bytes for OpenCV, None) or (None, refusal message)."""
    if why := sniff(data):
        return None, why
    try:
        with Image.open(io.BytesIO(data)) as img:  # header only so far
            w, h = img.size
            if w * h > max_pixels:
                return None, f"too many pixels to decode ({w}x{h})"
            if _is_plain(img, data):
                return data, None
            out = normalize(img)
    except Image.DecompressionBombError as err:
        return None, f"too many pixels to decode ({err})"
    except UnidentifiedImageError:
        return None, "decode error: not a known image format"
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:  # Pillow's ways of saying corrupt
        return None, f"decode error: {err}"
    buf = io.BytesIO()
    out.save(buf, "PPM")  # lossless and nearly free to write and read (P5 for L, P6 for RGB)
    return buf.getvalue(), None


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

    img2dataset.resizer.SuppressStdoutStderr = contextlib.nullcontext

    class GuardedResizer(Resizer):  # type: ignore[misc]
        def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
            img_stream.seek(0)
            data, why = prepare(img_stream.read(), cfg.max_decode_pixels)
            if why is not None:
                return (*_FAILED, why)
            return super().__call__(io.BytesIO(data), blurring_bbox_list)

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
