"""Similarity graphs and connected components (paper §A.3: kNN graph, k=64, cosine > 0.6, union-find).

:class:`UnionFind` is a disjoint-set forest over 0..n-1 whose unions are vectorised over edge batches: every
round hooks the larger root of each edge onto the smaller one (``np.minimum.at``) and then halves paths by
pointer jumping until every node points at its root. Parents only ever decrease, so the root of a component is
its smallest node index, whatever the edge order: labels are deterministic. Edges stream in batches, so the
graph never needs to be held whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from curation.index import BlockedIVF, SearchIndex, exact_search
from curation.vectors import RowView


class UnionFind:
    """Disjoint sets over 0..n-1; ``union_edges`` merges a whole batch of edges at numpy speed."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.parent)

    def compress(self) -> None:
        p = self.parent
        while True:
            grand = p[p]
            if np.array_equal(grand, p):
                return
            p[:] = grand

    def union_edges(self, src: np.ndarray, dst: np.ndarray) -> None:
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        self.compress()
        while len(src):
            ra, rb = self.parent[src], self.parent[dst]
            live = ra != rb
            src, dst, ra, rb = src[live], dst[live], ra[live], rb[live]
            if not len(src):
                return
            # Hook the larger root onto the smaller; several edges may target one root: the minimum wins, the
            # rest are retried next round against the new roots.
            np.minimum.at(self.parent, np.maximum(ra, rb), np.minimum(ra, rb))
            self.compress()

    def union(self, a: int, b: int) -> None:
        self.union_edges(np.array([a]), np.array([b]))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            x = int(self.parent[x])
        return x

    def labels(self) -> np.ndarray:
        """Component label per node: the smallest node index of its component."""
        self.compress()
        return self.parent.copy()


@dataclass
class Edges:
    src: np.ndarray  # int64 query node
    dst: np.ndarray  # int64 base node
    sim: np.ndarray  # float32 cosine (max over the query's views)

    @classmethod
    def empty(cls) -> Edges:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @classmethod
    def concat(cls, parts: list[Edges]) -> Edges:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("src", "dst", "sim")))

    def __len__(self) -> int:
        return len(self.src)

    def above(self, threshold: float) -> Edges:
        keep = self.sim > threshold
        return Edges(self.src[keep], self.dst[keep], self.sim[keep])

    def src_in(self, nodes: np.ndarray) -> Edges:
        keep = np.isin(self.src, nodes)
        return Edges(self.src[keep], self.dst[keep], self.sim[keep])


def knn_edges(index: SearchIndex, queries: Iterable[tuple[int, np.ndarray]], k: int, threshold: float, *,
              exclude_self: bool = True, adjust: Iterable[np.ndarray] | None = None) -> Edges:  # fmt: skip
    """Edges from each query node to its k nearest base nodes with similarity > threshold.

    ``queries`` yields (first node id, (m, V, D) view descriptors): V query views per node (e.g. centre crops and
    mirror images); the similarity of a (query, base) pair is the max over the views. ``adjust`` yields per-view
    score-normalisation offsets (m, V) subtracted before the max. With ``exclude_self`` the base index must hold
    the query nodes under the same ids and a node is never its own neighbour.
    """
    adjust_iter = iter(adjust) if adjust is not None else None
    parts = []
    for start, views in queries:
        m, v, dim = views.shape
        flat = views.reshape(m * v, dim)
        offsets = next(adjust_iter).reshape(m * v) if adjust_iter is not None else None
        if isinstance(index, BlockedIVF):  # every probed pair above the threshold, exact, as dense matmuls
            rows, dst, sim = index.range_pairs(flat, threshold, offsets)
            parts.append(_select(start + rows // v, dst, sim, k, threshold, exclude_self))
        else:
            sims, ids = index.search(flat, k + 1 if exclude_self else k)  # m*V, kk
            parts.append(_select_knn(np.arange(start, start + m), sims, ids, offsets, k, threshold, exclude_self))
    return Edges.concat(parts)


def exact_edges(base: RowView, nodes: np.ndarray, views: np.ndarray, k: int, threshold: float,
                offsets: np.ndarray | None = None, batch: int = 256) -> Edges:  # fmt: skip
    """The edges of ``nodes`` (query views (m, V, D), offsets (m, V)) in the exact graph over ``base``, by brute
    force: what :func:`knn_edges` gives with a flat index (self excluded). The reference for graph recall."""
    parts = []
    dim = views.shape[-1]
    for s in range(0, len(nodes), batch):
        flat = views[s : s + batch].reshape(-1, dim)
        sims, ids = exact_search(base, flat, k + 1)
        off = offsets[s : s + batch].reshape(-1) if offsets is not None else None
        parts.append(_select_knn(nodes[s : s + batch], sims, ids, off, k, threshold, True))
    return Edges.concat(parts)


def edge_recall(approx: Edges, exact: Edges, nodes: np.ndarray) -> dict:
    """Share of the exact graph's edges out of ``nodes`` that the approximate graph found."""
    mine = approx.src_in(nodes)
    n = int(max(approx.dst.max(initial=0), exact.dst.max(initial=0), nodes.max(initial=0))) + 1
    found = int(np.isin(exact.src * n + exact.dst, mine.src * n + mine.dst).sum())
    return {"queries": len(nodes), "exact_edges": len(exact), "found": found,
            "recall": round(found / len(exact), 4) if len(exact) else 1.0}  # fmt: skip


def _select_knn(nodes: np.ndarray, sims: np.ndarray, ids: np.ndarray, offsets: np.ndarray | None, k: int,
                threshold: float, exclude_self: bool) -> Edges:  # fmt: skip
    """kNN results (m*V, kk) of the views of ``nodes`` -> the nodes' edges."""
    if offsets is not None:
        sims = sims - offsets[:, None]
    src = np.repeat(nodes, sims.size // max(len(nodes), 1))
    return _select(src, ids.ravel(), sims.ravel().astype(np.float32), k, threshold, exclude_self)


def _select(src: np.ndarray, dst: np.ndarray, sim: np.ndarray, k: int, threshold: float, exclude_self: bool) -> Edges:
    # Thresholding before the per-node top-k gives the same edges (a pair above the threshold is among the
    # node's k best overall iff it is among its k best above the threshold) and leaves little to sort.
    keep = (dst >= 0) & (sim > threshold)
    if exclude_self:
        keep &= dst != src
    return _top_k_distinct(src[keep], dst[keep], sim[keep], k)


def _top_k_distinct(src: np.ndarray, dst: np.ndarray, sim: np.ndarray, k: int) -> Edges:
    """Per (src, dst) pair the max similarity; then per src its k best pairs (ties to the smaller dst)."""
    order = np.lexsort((dst, -sim, src))  # by src, similarity descending, dst
    src, dst, sim = src[order], dst[order], sim[order]
    pair = np.ones(len(src), bool)
    if len(src):  # first occurrence of each (src, dst) is its max; drop the others
        seen = np.unique(src * (dst.max() + 1) + dst, return_index=True)[1]
        pair[:] = False
        pair[seen] = True
    src, dst, sim = src[pair], dst[pair], sim[pair]
    order = np.lexsort((dst, -sim, src))
    src, dst, sim = src[order], dst[order], sim[order]
    rank = np.arange(len(src)) - np.searchsorted(src, src, side="left")
    keep = rank < k
    return Edges(src[keep], dst[keep], sim[keep])


def components(n: int, edges: Edges, start: UnionFind | None = None) -> np.ndarray:
    """Component label (smallest member index) per node of a graph with ``n`` nodes."""
    uf = start or UnionFind(n)
    uf.union_edges(edges.src, edges.dst)
    return uf.labels()
