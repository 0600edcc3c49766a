"""kNN similarity graphs and connected components (union-find), the core of copy dedup (paper §A.3)."""

from __future__ import annotations

import faiss
import numpy as np


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size, vectorised over edge batches."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = int(p[x])
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def union_edges(self, src: np.ndarray, dst: np.ndarray) -> None:
        for a, b in zip(src.tolist(), dst.tolist(), strict=True):
            self.union(a, b)

    def labels(self) -> np.ndarray:
        """Component label per node: the smallest node index in its component (deterministic)."""
        n = len(self.parent)
        roots = np.fromiter((self.find(i) for i in range(n)), dtype=np.int64, count=n)
        smallest = np.full(n, n, dtype=np.int64)
        np.minimum.at(smallest, roots, np.arange(n))
        return smallest[roots]


def knn_edges(
    base: np.ndarray, queries: np.ndarray, k: int, threshold: float, *, flip_queries: np.ndarray | None = None,
    batch: int = 65536,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Edges (query i, base j, cosine) among each query's k nearest base vectors with cosine > threshold.

    Vectors must be L2-normalised (inner product = cosine). With ``flip_queries`` (descriptors of the mirrored
    queries) an edge's similarity is the max over both, so mirrored copies are found.
    """
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    k = min(k, len(base))
    src, dst, sim = [], [], []
    for start in range(0, len(queries), batch):
        q = np.ascontiguousarray(queries[start : start + batch], dtype=np.float32)
        d, i = index.search(q, k)
        if flip_queries is not None:
            fq = np.ascontiguousarray(flip_queries[start : start + batch], dtype=np.float32)
            d2, i2 = index.search(fq, k)
            d, i = np.concatenate([d, d2], 1), np.concatenate([i, i2], 1)
        rows = np.repeat(np.arange(start, start + len(q)), i.shape[1])
        keep = (d.ravel() > threshold) & (i.ravel() >= 0)
        src.append(rows[keep])
        dst.append(i.ravel()[keep])
        sim.append(d.ravel()[keep])
    return np.concatenate(src), np.concatenate(dst), np.concatenate(sim)
