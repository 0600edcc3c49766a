"""Decoding and encoding of stored images, shared by every stage and protocol that looks at pixels."""

from __future__ import annotations

import io

from PIL import Image, ImageOps

# Stages below ingest see images that img2dataset already decoded and re-encoded, so a decode failure there
# means corruption on disk: it is recorded, never fatal. Decoders refuse bombs beyond this many pixels.
Image.MAX_IMAGE_PIXELS = 89_478_485


def decode(data: bytes, mode: str = "RGB") -> Image.Image:
    """Decode to ``mode`` with EXIF orientation applied; palette/alpha/16-bit/CMYK are converted predictably."""
    img = Image.open(io.BytesIO(data))
    img.seek(0)  # animated images: the first frame
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert(mode)


def encode(img: Image.Image, ext: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()
