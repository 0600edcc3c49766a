"""Perceptual hash (64-bit DCT hash) for hash dedup at ingestion (paper §A.3 post-processing)."""

from __future__ import annotations

import numpy as np
from PIL import Image

_N = 32  # the image is reduced to 32x32 grey, the hash keeps the 8x8 lowest DCT frequencies
_K = 8


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m  # orthonormal DCT-II: m @ m.T == I


_D = _dct_matrix(_N)[:_K]  # 8, 32


def phash(img: Image.Image) -> int:
    """64-bit hash as a signed int64: bit i says whether low-frequency DCT coefficient i is above the median."""
    g = np.asarray(img.convert("L").resize((_N, _N), Image.BILINEAR), np.float64)
    low = (_D @ g @ _D.T).ravel()  # 64 coefficients, DC first
    bits = low > np.median(low[1:])  # the DC term is left out of the median (it only says how bright)
    value = int(np.packbits(bits).view(">u8")[0])
    return value - (1 << 64) if value >= 1 << 63 else value


def to_hex(h: int) -> str:
    return f"{h & ((1 << 64) - 1):016x}"
