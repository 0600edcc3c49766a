"""Perceptual hash (64-bit DCT hash) and near-duplicate matching for hash dedup at ingestion (paper §A.3
post-processing, which uses a PCA hash; this is the DCT variant of the same idea: a few low frequencies, one bit each).
"""

from __future__ import annotations

import itertools

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


def distance(a: int, b: int) -> int:
    """Hamming distance between two hashes (signed or unsigned 64-bit ints)."""
    return ((a ^ b) & ((1 << 64) - 1)).bit_count()


def near_duplicates(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """For each hash, in order: the index of the first earlier *kept* hash at most ``max_distance`` bits away, or -1.

    A hash is kept when it has no such earlier hash (first row wins), so kept hashes are pairwise more than
    ``max_distance`` bits apart. 0 means equal hashes (vectorised). Above 0, multi-index hashing: two hashes within d
    bits agree exactly on at least one of d + 1 disjoint bit blocks, so a hash is only compared with the kept hashes
    that share one of its block values. Expected comparisons per hash: kept / 2^(64 / (d + 1)) per block, e.g. d = 3
    and 1e6 kept hashes: 4 x 15.
    """
    h = np.ascontiguousarray(hashes, np.int64).view(np.uint64)
    out = np.full(len(h), -1, np.int64)
    if max_distance == 0:
        _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        first_of = first[inverse.ravel()]
        dup = first_of != np.arange(len(h))
        out[dup] = first_of[dup]
        return out
    edges = [round(64 * b / (max_distance + 1)) for b in range(max_distance + 2)]
    blocks = [(lo, (1 << (hi - lo)) - 1) for lo, hi in itertools.pairwise(edges)]
    tables: list[dict[int, list[int]]] = [{} for _ in blocks]
    values = h.tolist()
    for i, v in enumerate(values):
        keys = [(v >> lo) & mask for lo, mask in blocks]
        best = -1
        for table, key in zip(tables, keys, strict=True):
            for j in table.get(key, ()):  # ascending: the first match is this block's earliest
                if 0 <= best <= j:
                    break
                if (v ^ values[j]).bit_count() <= max_distance:
                    best = j
                    break
        if best >= 0:
            out[i] = best
        else:
            for table, key in zip(tables, keys, strict=True):
                table.setdefault(key, []).append(i)
    return out
