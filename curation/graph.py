"""Similarity graphs and connected components (paper §A.3: kNN graph, k=64, cosine > 0.6, union-find).

:class:`UnionFind` is a disjoint-set forest over 0..n-1 whose unions are vectorised over edge batches: every
round hooks the larger root of each edge onto the smaller one (``np.minimum.at``) and then halves paths by
pointer jumping until every node points at its root. Parents only ever decrease, so the root of a component is
its smallest node index, whatever the edge order: labels are deterministic. Edges stream in batches, so the
graph never needs to be held whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from curation.index import SearchIndex, exact_search
from curation.ivf_blocks import BlockedIVF
from curation.vectors import RowView, VectorStore
from infra.memory import release_free_heap


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


@dataclass
class QueryViews:
    """Query views of nodes 0..n-1, (n, V, D) or (n, D) for one view, read by chunk or by row; ``transform`` (e.g.
    whitening) applies to every block, ``offsets`` maps (m, V, D) views to (m, V) score-normalisation offsets."""

    views: VectorStore | np.ndarray
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    offsets: Callable[[np.ndarray], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.views)

    @property
    def n_views(self) -> int:
        return self.views.shape[1] if len(self.views.shape) == 3 else 1

    def _prep(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        v = np.asarray(block, np.float32)
        v = v if v.ndim == 3 else v[:, None, :]
        v = self.transform(v) if self.transform is not None else v
        return v, (self.offsets(v) if self.offsets is not None else None)

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        if isinstance(self.views, VectorStore):
            blocks: Iterable[tuple[int, np.ndarray]] = self.views.chunks(size)
        else:
            blocks = ((s, self.views[s : s + size]) for s in range(0, len(self.views), size))
        for start, block in blocks:
            yield (start, *self._prep(block))

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        block = self.views.take(rows) if isinstance(self.views, VectorStore) else self.views[rows]
        return self._prep(block)


def knn_edges(index: SearchIndex, queries: QueryViews | np.ndarray, k: int, threshold: float, *,
              exclude_self: bool = True, view0_is_base: bool = False, chunk: int = 4096) -> Edges:  # fmt: skip
    """Edges from each query node to its k nearest base nodes with similarity > threshold.

    ``queries``: V query views per node (e.g. centre crops and mirror images); the similarity of a (query, base)
    pair is the max over the views, minus the view's score-normalisation offset when given. With ``exclude_self``
    the base index holds the query nodes under the same ids (a self graph): a node is never its own neighbour, and
    with an approximate index every found edge's reverse pair is scored exactly too (the graph is searched from
    both ends). ``view0_is_base``: view 0 of node i is base vector i (the index's own vectors; a
    :class:`BlockedIVF` then reuses the lists found for it at build time). A :class:`BlockedIVF` with ``nprobe_wide`` searches the nodes that have an edge after the first pass
    (and, in a self graph, the nodes they point to) again in the ``nprobe_wide`` best lists.
    """
    q = queries if isinstance(queries, QueryViews) else QueryViews(np.asarray(queries, np.float32))
    view0_is_base = view0_is_base and isinstance(index, BlockedIVF) and index.base_probes.shape[1] == index.nprobe
    if isinstance(index, BlockedIVF) and view0_is_base and q.n_views == 1 and q.transform is None:
        offsets = np.concatenate([off[:, 0] for _, _, off in q.chunks(chunk)]) if q.offsets is not None else None
        parts = [_select(src, dst, sim, k, threshold, True) for src, dst, sim in index.self_pairs(threshold, offsets)]
    else:
        parts = [_node_edges(index, nodes, v, off, k, threshold, exclude_self, None, view0_is_base)
                 for nodes, v, off in _chunks(index, q, chunk, view0_is_base)]  # fmt: skip
    edges = Edges.concat(parts)
    if isinstance(index, BlockedIVF) and index.nprobe_wide:
        release_free_heap()  # the first pass's freed blocks, before the second pass allocates its own
        index.vectors.drop_resident()
        flagged = np.unique(np.concatenate([edges.src, edges.dst]) if exclude_self else edges.src)
        for s in range(0, len(flagged), chunk):
            v, off = q.take(flagged[s : s + chunk])
            wide = index.wide_probes(v.reshape(-1, v.shape[-1]))
            parts.append(_node_edges(index, flagged[s : s + chunk], v, off, k, threshold, exclude_self, wide))
        edges = Edges.concat(parts)
    if exclude_self and index.kind != "flat" and len(edges):
        edges = _closure(index, q, edges, threshold, k)
    return _top_k_distinct(edges.src, edges.dst, edges.sim, k)


def _chunks(index: SearchIndex, q: QueryViews, chunk: int, view0_is_base: bool,
            ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:  # fmt: skip
    """(node ids, views, offsets) chunk by chunk; for a :class:`BlockedIVF` over the nodes' own vectors in list order,
    so that a chunk probes few lists, each by many of its queries (large matmuls, and as many of them as lists)."""
    if isinstance(index, BlockedIVF) and view0_is_base:
        for s in range(0, len(q), chunk):
            nodes = np.sort(index.ids[s : s + chunk])
            yield (nodes, *q.take(nodes))
        return
    for start, v, off in q.chunks(chunk):
        yield start + np.arange(len(v)), v, off


def _node_edges(index: SearchIndex, nodes: np.ndarray, views: np.ndarray, offsets: np.ndarray | None, k: int,
                threshold: float, exclude_self: bool, probes: np.ndarray | None = None,
                view0_is_base: bool = False) -> Edges:  # fmt: skip
    m, v, dim = views.shape
    flat = views.reshape(m * v, dim)
    off = offsets.reshape(m * v) if offsets is not None else None
    if isinstance(index, BlockedIVF):  # every probed pair above the threshold, exact, as dense matmuls
        if probes is None and view0_is_base:  # view 0 is the base vector: its lists are known from the build
            p = np.empty((m, v, index.nprobe), np.int64)
            p[:, 0] = index.base_probes[nodes]
            if v > 1:
                p[:, 1:] = index.probe(views[:, 1:].reshape(-1, dim), index.nprobe).reshape(m, v - 1, -1)
            probes = p.reshape(m * v, -1)
        rows, dst, sim = index.range_pairs(flat, threshold, off, probes, np.repeat(nodes, v) if exclude_self else None)
        return _select(nodes[rows // v], dst, sim, k, threshold, exclude_self)
    sims, ids = index.search(flat, k + 1 if exclude_self else k)  # m*V, kk
    return _select_knn(nodes, sims, ids, off, k, threshold, exclude_self)


def _closure(index: SearchIndex, queries: QueryViews, edges: Edges, threshold: float, k: int, rounds: int = 2) -> Edges:
    """The self graph searched from both ends and through common neighbours: for every found edge a - b the pair
    b -> a, and for every two neighbours b, c of one node (its k most similar) the pair b -> c, each scored exactly
    and kept above the threshold; ``rounds`` times. Near-copies of one image are near each other, so an edge a
    probe missed (copy to copy: the hardest pairs) is found through the original both copies are linked to."""
    for _ in range(rounds):
        src, dst = _candidates(edges, k)
        new = _pair_edges(index, queries, src, dst, threshold)
        if not len(new):
            break
        edges = Edges.concat([edges, new])
    return edges


def _candidates(edges: Edges, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) pairs not yet in ``edges``: reversed edges and pairs of neighbours of one node."""
    n = int(max(edges.src.max(), edges.dst.max())) + 1
    a, b = np.concatenate([edges.src, edges.dst]), np.concatenate([edges.dst, edges.src])
    sim = np.concatenate([edges.sim, edges.sim])
    order = np.lexsort((b, -sim, a))
    a, b = a[order], b[order]
    first = np.unique(a * n + b, return_index=True)[1]  # each undirected neighbour once, most similar first
    a, b = a[np.sort(first)], b[np.sort(first)]
    _, start, deg = np.unique(a, return_index=True, return_counts=True)
    deg = np.minimum(deg, k)
    reps = deg * deg
    at = np.repeat(start, reps)
    local = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
    i, j = at + local // np.repeat(deg, reps), at + local % np.repeat(deg, reps)
    pairs = np.concatenate([np.stack([a, b], 1), np.stack([b[i], b[j]], 1)[i != j]])
    key = np.unique(pairs[:, 0] * n + pairs[:, 1])
    key = key[~np.isin(key, edges.src * n + edges.dst)]
    return key // n, key % n


def _pair_edges(index: SearchIndex, queries: QueryViews, src: np.ndarray, dst: np.ndarray, threshold: float,
                batch: int = 65_536) -> Edges:  # fmt: skip
    """Exact similarity of given pairs (max over src's views against dst's base vector, minus offsets), kept above
    the threshold."""
    out = []
    for s in range(0, len(src), batch):
        b, a = src[s : s + batch], dst[s : s + batch]
        nodes, inv = np.unique(b, return_inverse=True)
        views, off = queries.take(nodes)
        sim = np.einsum("mvd,md->mv", views[inv], index.vectors.take(a))
        sim = (sim - off[inv] if off is not None else sim).max(1)
        keep = sim > threshold
        out.append(Edges(b[keep], a[keep], sim[keep].astype(np.float32)))
    return Edges.concat(out)


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
