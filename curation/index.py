"""FAISS indexes chosen by scale, exact re-scoring, brute-force reference search and measured recall.

All vectors are L2-normalised, so inner product = cosine (paper §A.2). ``flat`` is exact; ``ivf_flat`` stores full
vectors in inverted lists (exact scores, approximate candidates); ``ivfpq`` stores PQ codes (paper §3: GPU IVF-PQ
at 1B scale) and its candidates are re-scored exactly from the stored vectors, so no threshold or similarity
downstream ever sees a PQ-approximate score. A FAISS GPU build with a visible device is used when allowed.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from curation.vectors import RowView, VectorStore, VectorWriter
from infra.config.curation import IndexConfig

ADD_CHUNK = 65_536


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_kind(n: int, cfg: IndexConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    return "flat" if n <= cfg.flat_max else cfg.large


def default_nlist(n: int) -> int:
    """About 4 sqrt(n) lists, a power of two, at least 1 and at most n / 39 (FAISS's minimum points per list)."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(nlist, n // 39 or 1)))


def choose_nlist(n: int, cfg: IndexConfig) -> int:
    """``nlist`` if set; else ceil(n / ``list_size``) (lists of a fixed size: work per query independent of n);
    else :func:`default_nlist` (~4 sqrt(n): lists grow as sqrt(n), total search work as n^1.5). At most n."""
    if cfg.nlist is not None:
        nlist = cfg.nlist
    elif cfg.list_size is not None:
        nlist = -(-n // cfg.list_size)
    else:
        nlist = default_nlist(n)
    return int(max(1, min(nlist, n)))


@dataclass
class SearchIndex:
    index: faiss.Index
    kind: str
    vectors: RowView
    refine_factor: int = 1
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def exact_scores(self) -> bool:
        return self.kind != "ivfpq"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the k best base vectors per query, best first; ids -1 (sim -inf) where fewer exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.index.ntotal))
        if self.exact_scores:
            return self.index.search(q, k)
        cand = self.index.search(q, min(k * self.refine_factor, self.index.ntotal))[1]
        return rescore(q, cand, self.vectors, k)


def rescore(q: np.ndarray, cand: np.ndarray, vectors: RowView, k: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate ids; the top k of them, best first."""
    sims = np.full((len(q), k), -np.inf, np.float32)
    ids = np.full((len(q), k), -1, np.int64)
    for s in range(0, len(q), batch):
        c = cand[s : s + batch]
        uniq, inv = np.unique(np.where(c >= 0, c, 0), return_inverse=True)
        base = vectors.take(uniq)[inv.reshape(c.shape)]  # b, kk, D
        score = np.einsum("bd,bkd->bk", q[s : s + batch], base)
        score[c < 0] = -np.inf
        order = np.argsort(-score, axis=1, kind="stable")[:, :k]
        sims[s : s + batch, : order.shape[1]] = np.take_along_axis(score, order, 1)
        ids[s : s + batch, : order.shape[1]] = np.where(np.isfinite(sims[s : s + batch, : order.shape[1]]),
                                                        np.take_along_axis(c, order, 1), -1)  # fmt: skip
    return sims, ids


def build_index(vectors: RowView, cfg: IndexConfig, seed: int = 0, work_dir: Path | None = None) -> SearchIndex:
    """An index over ``vectors`` (memory-mapped rows are added chunk by chunk)."""
    n, dim = len(vectors), vectors.dim
    kind = choose_kind(n, cfg)
    if kind == "ivf_blocks":
        return BlockedIVF.build(vectors, cfg, seed, work_dir)
    params: dict[str, Any] = {"kind": kind, "n": n}
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
    else:
        nlist = choose_nlist(n, cfg)
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if dim % cfg.pq_m:
                raise ValueError(f"index.pq_m={cfg.pq_m} must divide the vector dimension {dim}")
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, cfg.pq_nbits, faiss.METRIC_INNER_PRODUCT)
            index.pq.cp.niter = 10  # sub-quantizer k-means: 10 iterations on at most 64 points per centroid
            index.pq.cp.max_points_per_centroid = 64
            params.update(pq_m=cfg.pq_m, pq_nbits=cfg.pq_nbits, refine_factor=cfg.refine_factor)
        index.cp.niter = 10
        index.cp.seed = seed
        rng = np.random.default_rng(seed)
        # Enough for the coarse quantizer (64 per list) and, for PQ, each sub-quantizer's 2^nbits centroids.
        train_n = min(n, cfg.train_size, max(64 * nlist, 64 * 2**cfg.pq_nbits if kind == "ivfpq" else 0))
        train = vectors.take(np.sort(rng.choice(n, train_n, replace=False)))
        index.train(train)
        index.nprobe = min(cfg.nprobe, nlist)
        params.update(nlist=nlist, nprobe=index.nprobe, train_size=train_n)
    if cfg.use_gpu == "auto" and gpu_available():
        index = faiss.index_cpu_to_all_gpus(index)
        params["gpu"] = True
    for _, block in vectors.chunks(ADD_CHUNK):
        index.add(np.ascontiguousarray(block))
    return SearchIndex(index, kind, vectors, cfg.refine_factor if kind == "ivfpq" else 1, params)


@dataclass(kw_only=True)
class BlockedIVF(SearchIndex):
    """IVF partition whose probed lists are scanned as dense matmuls (all queries probing a list at once).

    Built for threshold graphs: :meth:`range_pairs` returns every (query row, base id, cosine) above a threshold
    among the probed lists, with exact cosines; the per-node top-k happens afterwards on the few survivors.
    Base vectors are written sorted by list (fp16 ``.npy``), so a list is one contiguous read.
    """

    lists: VectorStore  # base vectors grouped by list
    ids: np.ndarray  # (n,) base id of each row of ``lists``
    bounds: np.ndarray  # (nlist + 1,) row range of each list
    nprobe: int = 8
    scanned: int = 0  # (query, base vector) pairs scored so far: the search work, independent of the machine

    @classmethod
    def build(cls, vectors: RowView, cfg: IndexConfig, seed: int, work_dir: Path | None) -> BlockedIVF:
        n, dim = len(vectors), vectors.dim
        nlist = choose_nlist(n, cfg)
        rng = np.random.default_rng(seed)
        train = vectors.take(np.sort(rng.choice(n, min(n, cfg.train_size, 64 * nlist), replace=False)))
        quantizer: faiss.Index | CentroidIVF
        if cfg.quantizer == "ivf":
            quantizer = CentroidIVF.train(train, nlist, cfg.quantizer_nprobe, seed)
            nlist = quantizer.ntotal  # the per-group split rounds the total
        else:
            km = faiss.Kmeans(dim, nlist, niter=10, seed=seed, spherical=True, verbose=False)
            km.train(np.ascontiguousarray(train))
            quantizer = faiss.IndexFlatIP(dim)
            quantizer.add(km.centroids)
        assign = np.concatenate([quantizer.search(np.ascontiguousarray(b), 1)[1].ravel() for _, b in vectors.chunks()])
        order = np.argsort(assign, kind="stable")
        bounds = np.searchsorted(assign[order], np.arange(nlist + 1))
        work_dir = Path(work_dir or tempfile.mkdtemp(prefix="ivf_blocks_"))
        writer = VectorWriter(work_dir / "ivf_lists.npy", n, dim)
        for s in range(0, n, ADD_CHUNK):
            writer.add(vectors.take(order[s : s + ADD_CHUNK]))
        params = {"kind": "ivf_blocks", "n": n, "nlist": nlist, "nprobe": min(cfg.nprobe, nlist), "train_size": len(train),
                  "list_size": cfg.list_size, "quantizer": cfg.quantizer}  # fmt: skip
        if isinstance(quantizer, CentroidIVF):
            params.update(quantizer_groups=len(quantizer.top), quantizer_nprobe=quantizer.nprobe)
        return cls(index=quantizer, kind="ivf_blocks", vectors=vectors, params=params,
                   lists=VectorStore([writer.close()]), ids=order, bounds=bounds, nprobe=min(cfg.nprobe, nlist))  # fmt: skip

    def range_pairs(self, queries: np.ndarray, threshold: float, offsets: np.ndarray | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """(query row, base id, cosine - offset) for every probed pair above ``threshold``."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        probes = self.index.search(q, self.nprobe)[1]  # m, nprobe: the coarse quantizer
        pairs = np.stack([probes.ravel(), np.repeat(np.arange(len(q)), probes.shape[1])], 1)
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
        cuts = np.searchsorted(pairs[:, 0], np.arange(len(self.bounds)))
        src, dst, sim = [], [], []
        qt = torch.from_numpy(q)
        for lst in np.unique(pairs[:, 0]):
            lo, hi = self.bounds[lst], self.bounds[lst + 1]
            if hi == lo:
                continue
            rows = pairs[cuts[lst] : cuts[lst + 1], 1]
            self.scanned += len(rows) * int(hi - lo)
            base = torch.from_numpy(np.asarray(self.lists.arrays[0][lo:hi], dtype=np.float32))
            s = (torch.index_select(qt, 0, torch.from_numpy(rows)) @ base.T).numpy()  # probing queries x members
            if offsets is not None:
                s -= offsets[rows][:, None]
            r, c = np.nonzero(s > threshold)
            src.append(rows[r])
            dst.append(self.ids[lo + c])
            sim.append(s[r, c])
        if not src:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(src), np.concatenate(dst), np.concatenate(sim).astype(np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among the probed lists (exact scores), for callers that need plain kNN."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        r, d, s = self.range_pairs(q, -np.inf)
        sims = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        order = np.lexsort((d, -s, r))
        r, d, s = r[order], d[order], s[order]
        rank = np.arange(len(r)) - np.searchsorted(r, r, side="left")
        keep = rank < k
        sims[r[keep], rank[keep]], ids[r[keep], rank[keep]] = s[keep], d[keep]
        return sims, ids


@dataclass
class CentroidIVF:
    """Coarse quantizer over many centroids: an IVF over the centroids themselves.

    Trained two-level: ``G`` ~ sqrt(nlist) group centres by spherical k-means on the training sample, then each
    group's training points are clustered into a share of the ``nlist`` centroids proportional to their number.
    A query scores the G group centres, then only the centroids of its ``nprobe`` best groups, and returns the
    best k of those (exact inner products). Work per query is G + nprobe * nlist / G ~ (nprobe + 1) sqrt(nlist)
    dot products instead of nlist, and training costs ~2 sqrt(nlist) per training point and iteration instead of
    nlist, so with lists of a fixed size (nlist ~ n) quantization stays sub-linear per vector.
    The two-level split cuts fine cells at group borders; ``refine`` Lloyd steps with assignment through the
    quantizer itself (any probed group) undo most of that (edge recall of the bench's dedup graph at N=100k, lists
    of 256, 8 lists and 16 groups probed: 0.930 without, 0.943 with 3 steps; a flat quantizer over a global k-means:
    0.941). Centroid ids are numbered group by group: group g owns ids ``bounds[g]:bounds[g+1]``.
    """

    top: np.ndarray  # (G, D) group centres
    centroids: np.ndarray  # (nlist, D) sorted by group
    bounds: np.ndarray  # (G + 1,)
    nprobe: int
    scored: int = 0  # (query, centre or centroid) pairs scored so far

    @property
    def ntotal(self) -> int:
        return len(self.centroids)

    @classmethod
    def train(cls, x: np.ndarray, nlist: int, nprobe: int, seed: int, niter: int = 10, refine: int = 3) -> CentroidIVF:
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, dim = x.shape
        nlist = max(1, min(nlist, n))
        groups = max(1, min(round(math.sqrt(nlist)), nlist))
        top = _spherical_kmeans(x, groups, niter, seed)
        flat = faiss.IndexFlatIP(dim)
        flat.add(top)
        g_of = flat.search(x, 1)[1].ravel()
        counts = np.bincount(g_of, minlength=groups)
        share = np.minimum(np.maximum(np.round(nlist * counts / n).astype(np.int64), counts > 0), counts)
        parts, keep = [], []
        for g in np.flatnonzero(share):  # empty groups are dropped
            parts.append(_spherical_kmeans(x[g_of == g], int(share[g]), niter, seed + 1 + int(g)))
            keep.append(g)
        bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        q = cls(top[keep], np.concatenate(parts), bounds, max(1, min(nprobe, len(keep))))
        for _ in range(refine):
            q.refine(x)
        return q

    def refine(self, x: np.ndarray) -> None:
        """One Lloyd step with assignment through the quantizer itself: every centroid moves to the (normalised)
        mean of the training points it now receives, from any group; group centres to the mean of their centroids."""
        a = torch.from_numpy(self.search(x, 1)[1].ravel())
        sums = torch.zeros(self.centroids.shape, dtype=torch.float64).index_add_(0, a, torch.from_numpy(x).double())
        moved = np.bincount(a.numpy(), minlength=len(self.centroids)) > 0
        self.centroids[moved] = _unit_rows(sums.numpy()[moved])
        group = torch.from_numpy(np.repeat(np.arange(len(self.top)), np.diff(self.bounds)))
        tops = torch.zeros(self.top.shape, dtype=torch.float64).index_add_(0, group, torch.from_numpy(self.centroids).double())
        self.top = _unit_rows(tops.numpy())

    def search(self, queries: np.ndarray, k: int, block: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the best k centroids among the probed groups; ids -1 (sim -inf) where fewer exist."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        top, cents = torch.from_numpy(self.top), torch.from_numpy(self.centroids)
        p, widest = self.nprobe, int(np.diff(self.bounds).max())
        k_out = min(k, p * widest)
        sims = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        rows_per = max(1, block // (p * widest + len(self.top)))  # bounds the (rows, p, widest) score buffer
        for s in range(0, len(q), rows_per):
            qs = q[s : s + rows_per]
            probe = torch.topk(qs @ top.T, p, dim=1).indices.numpy()  # r, p
            self.scored += len(qs) * len(top)
            buf = torch.full((len(qs), p, widest), -math.inf)  # scores of each probed group's centroids, padded
            slots = probe.ravel()
            order = np.argsort(slots, kind="stable")
            cuts = np.searchsorted(slots[order], np.arange(len(self.top) + 1))
            for g in np.unique(slots):
                sel = order[cuts[g] : cuts[g + 1]]  # flat (row, probe-rank) slots probing group g
                r, j = torch.from_numpy(sel // p), torch.from_numpy(sel % p)
                lo, hi = int(self.bounds[g]), int(self.bounds[g + 1])
                buf[r, j, : hi - lo] = torch.index_select(qs, 0, r) @ cents[lo:hi].T
                self.scored += len(sel) * (hi - lo)
            flat = buf.reshape(len(qs), -1)
            if k_out == 1:  # assignment: one max beats a top-k
                val, pos = flat.max(1, keepdim=True)
            else:
                val, pos = torch.topk(flat, k_out, dim=1)
            pos = pos.numpy()
            cid = self.bounds[np.take_along_axis(probe, pos // widest, 1)] + pos % widest
            val = val.numpy()
            sims[s : s + len(qs), :k_out] = val
            ids[s : s + len(qs), :k_out] = np.where(np.isfinite(val), cid, -1)
        return sims, ids


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _spherical_kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    if k >= len(x):
        return _unit_rows(x)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x))
    return km.centroids


def exact_search(vectors: RowView, queries: np.ndarray, k: int, chunk: int | None = None,
                 block: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Brute-force top-k by inner product over chunks of the base (the reference for recall); ``chunk`` defaults to
    as many base rows as keep the (queries x chunk) score block within ``block`` floats."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    k = max(1, min(k, len(vectors)))
    chunk = chunk or max(1024, block // max(len(q), 1))
    best_s = torch.full((len(q), 0), -math.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.int64)
    for start, block in vectors.chunks(chunk):
        s = q @ torch.from_numpy(block).T  # m, b
        s, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)
        order = torch.argsort(-s, dim=1, stable=True)[:, :k]
        best_s, best_i = torch.gather(s, 1, order), torch.gather(i, 1, order)
    return best_s.numpy(), best_i.numpy()


def recall_at_k(index: SearchIndex, queries: np.ndarray, k: int) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k over the queries."""
    if len(queries) == 0:
        return 1.0
    _, approx = index.search(queries, k)
    _, exact = exact_search(index.vectors, queries, k)
    hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits) / exact.shape[1])
