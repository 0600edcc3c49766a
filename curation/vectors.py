"""Vectors on disk: fp16 ``.npy`` files per shard, memory-mapped and read in chunks.

Every large array of the curation stages (descriptors, embeddings) lives like this, so peak memory depends on
the chunk size and never on the pool size. A :class:`VectorStore` concatenates the shards virtually: global row
``i`` is row ``i - offset[s]`` of shard ``s``.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from infra.storage import atomic_path


def write_vectors(path: Path, vectors: np.ndarray) -> Path:
    """Write (N, D) vectors as fp16 ``.npy`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(vectors, dtype=np.float16))
    return Path(path)


def drop_resident(array: np.ndarray) -> None:
    """Unmaps the pages of a memory-mapped array from this process (``MADV_DONTNEED``; written pages are flushed
    first): they leave its resident set and stay in the OS page cache, so a later read costs a minor fault, not a
    disk read. A no-op for in-memory arrays, copy-on-write maps and where ``madvise`` is missing."""
    mm = getattr(array, "_mmap", None)
    if not isinstance(array, np.memmap) or mm is None or not hasattr(mm, "madvise") or array.mode == "c":
        return  # mode "c" (copy-on-write): dropping its pages would drop this process's writes
    if array.mode in ("r+", "w+"):
        array.flush()
    mm.madvise(mmap.MADV_DONTNEED)


class VectorWriter:
    """Fill an fp16 ``.npy`` of known shape row-block by row-block (memory-mapped), renamed into place on close."""

    def __init__(self, path: Path, n: int, dim: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.n = 0
        if n == 0:  # an empty memmap cannot be mapped
            np.save(self.tmp, np.zeros((0, dim), np.float16), allow_pickle=False)
            self.tmp = self.tmp.with_name(self.tmp.name + ".npy")
            self.array = np.zeros((0, dim), np.float16)
            return
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float16, shape=(n, dim))

    def add(self, block: np.ndarray) -> None:
        self.array[self.n : self.n + len(block)] = block
        self.n += len(block)

    def close(self) -> Path:
        assert self.n == self.array.shape[0], f"{self.path}: wrote {self.n} of {self.array.shape[0]} rows"
        if isinstance(self.array, np.memmap):
            self.array.flush()
        del self.array
        with atomic_path(self.path) as tmp:
            self.tmp.replace(tmp)
        return self.path


class VectorStore:
    """Read-only view over fp16 vector shards; rows are float32 when they leave the store."""

    def __init__(self, paths: Sequence[Path], dim: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.arrays = [np.load(p, mmap_mode="r") for p in self.paths]
        dims = {a.shape[-1] for a in self.arrays if a.shape[0]}
        if len(dims) > 1:
            raise ValueError(f"vector shards disagree on the dimension: {sorted(dims)}")
        self.dim = dims.pop() if dims else (dim or 0)
        sizes = np.array([a.shape[0] for a in self.arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])

    @classmethod
    def from_array(cls, array: np.ndarray, path: Path) -> VectorStore:
        return cls([write_vectors(path, array)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.arrays[0].shape[1:]) if self.arrays else (0, self.dim)

    def chunks(self, size: int = 65_536) -> Iterator[tuple[int, np.ndarray]]:
        """(global start, float32 block) in order; blocks never straddle shards and hold at most ``size`` rows."""
        for s, arr in enumerate(self.arrays):
            for i in range(0, arr.shape[0], size):
                yield int(self.offsets[s] + i), np.asarray(arr[i : i + size], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Float32 rows at the given global positions (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float32)
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            local = rows[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")  # sorted reads are kind to the page cache
            out[sel[order]] = self.arrays[s][local[order]]
        return out

    def read_all(self) -> np.ndarray:
        """Everything as float32 (small stores and tests only)."""
        return self.take(np.arange(len(self)))

    def drop_resident(self) -> None:
        """Pages read so far leave this process's resident set (:func:`drop_resident`); e.g. after a full pass."""
        for a in self.arrays:
            drop_resident(a)


class RowView:
    """The rows ``rows`` of a store (or an in-memory array), with the store's chunked read interface."""

    def __init__(self, source: VectorStore | np.ndarray, rows: np.ndarray | None = None):
        self.source = source
        self.identity = rows is None
        self.rows = np.arange(len(source), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.dim = source.shape[1]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.dim)

    def take(self, positions: np.ndarray) -> np.ndarray:
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        if isinstance(self.source, np.ndarray):
            return np.asarray(self.source[rows], dtype=np.float32)
        return self.source.take(rows)

    def drop_resident(self) -> None:
        if isinstance(self.source, VectorStore):
            self.source.drop_resident()

    def chunks(self, size: int = 65_536) -> Iterator[tuple[int, np.ndarray]]:
        if self.identity and isinstance(self.source, VectorStore):
            yield from self.source.chunks(size)
            return
        for i in range(0, len(self.rows), size):
            yield i, self.take(np.arange(i, min(i + size, len(self.rows))))
