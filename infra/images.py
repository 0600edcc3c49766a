"""Image files as users have them: which files are images, and one way of turning their bytes into pixels.

Every reader of a user's files goes through here: `lvd folder-urls` (which files of a folder are listed), the
seed and evaluation set readers, `python -m training.pretrain --data FOLDER`, ingest's conversion of what
img2dataset's OpenCV decoder gets wrong (curation/imageguard.py), and every stage and protocol that decodes stored
images. So a photograph gives the same pixels whichever way it enters: first frame of an animation, EXIF
orientation applied, CMYK/YCbCr -> RGB, palette -> RGB, 16-bit -> 8-bit (the top byte, never clipped), 1-bit ->
grey, alpha composited on white (img2dataset's rule), grey kept single-channel until the caller asks for RGB.

HEIC/HEIF (what phones store photographs as) is decoded by ``pi-heif`` (libheif with the libde265 HEVC decoder,
LGPL, no encoder), registered with Pillow when this module is imported.
"""

from __future__ import annotations

import io
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps

# Stages below ingest see images that img2dataset already decoded and re-encoded, so a decode failure there
# means corruption on disk: it is recorded, never fatal. Decoders refuse bombs beyond this many pixels.
Image.MAX_IMAGE_PIXELS = 89_478_485

try:  # HEIC/HEIF: a dependency (pyproject.toml); without it such files are "not a known image format"
    import pi_heif

    pi_heif.register_heif_opener()
    HEIF = True
except ImportError:  # pragma: no cover - the package is a dependency
    HEIF = False

# File name suffixes of the raster formats cameras, phones, scanners and browsers write, all decodable here.
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif",  # JPEG
    ".png", ".apng", ".gif", ".webp", ".avif", ".bmp", ".dib",
    ".tif", ".tiff",  # scanners, microscopes, 16-bit
    ".jp2", ".j2k",  # JPEG 2000 (scans, slides)
    ".ppm", ".pgm", ".pbm", ".pnm",  # Netpbm
    ".heic", ".heif", ".hif",  # phones (HEVC in HEIF)
})  # fmt: skip
# Suffixes of image files this project cannot decode, named when a folder is listed (camera raw, vector, layered).
UNDECODABLE_SUFFIXES = frozenset({".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2", ".raf", ".srw", ".pef",
                                  ".svg", ".psd", ".xcf", ".jxl", ".ico", ".eps"})  # fmt: skip
_ORIENTATION = 0x0112


def is_image_name(name: str | PurePath) -> bool:
    """Whether a file name has an image suffix (any case: `IMG_0001.HEIC`)."""
    return PurePath(name).suffix.lower() in IMAGE_SUFFIXES


def is_hidden(rel: PurePath) -> bool:
    """A path, relative to the folder being read, inside a hidden folder or naming a hidden file: `.DS_Store`,
    macOS's `._IMG_0001.jpg` resource forks (not images, despite the suffix), `.thumbnails/`, Synology's `@eaDir/`
    thumbnails (copies of the photographs beside them)."""
    return any(part.startswith((".", "@eaDir")) for part in rel.parts)


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, sub-folders included, hidden ones left out, in path order: what a set's
    class folder holds (as torchvision's ImageFolder reads one) and what `training.pretrain --data FOLDER` trains on."""
    return sorted(f for f in Path(folder).rglob("*") if f.is_file() and is_image_name(f.name)
                  and not is_hidden(f.relative_to(folder)))


def _on_white(img: Image.Image, mode: str) -> Image.Image:
    rgba = img.convert("RGBA")
    out = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return out.convert(mode)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1: upright)."""
    return img.getexif().get(_ORIENTATION, 1)


def normalize(img: Image.Image) -> Image.Image:
    """An opened image as an 8-bit "L" or "RGB" image by the rules above (the first frame of an animation is the
    one open; a caller that moved on seeks back first)."""
    if orientation(img) != 1:
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


def decode(data: bytes, mode: str | None = "RGB") -> Image.Image:
    """Decode bytes by :func:`normalize`'s rules, then to ``mode`` (None: "L" for grey images, else "RGB").
    Raises Pillow's errors (`UnidentifiedImageError`, `OSError`, ...) for what cannot be decoded."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        out = normalize(img)
    return out if mode is None or out.mode == mode else out.convert(mode)


def encode(img: Image.Image, ext: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()
