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
        nlist = min(cfg.nlist or default_nlist(n), max(1, n))
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

    @classmethod
    def build(cls, vectors: RowView, cfg: IndexConfig, seed: int, work_dir: Path | None) -> BlockedIVF:
        n, dim = len(vectors), vectors.dim
        nlist = min(cfg.nlist or default_nlist(n), max(1, n))
        rng = np.random.default_rng(seed)
        train = vectors.take(np.sort(rng.choice(n, min(n, cfg.train_size, 64 * nlist), replace=False)))
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
        params = {"kind": "ivf_blocks", "n": n, "nlist": nlist, "nprobe": min(cfg.nprobe, nlist), "train_size": len(train)}
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
            base = torch.from_numpy(np.asarray(self.lists.arrays[0][lo:hi], dtype=np.float32))
            s = (qt[rows] @ base.T).numpy()  # queries probing this list x its members
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


def exact_search(vectors: RowView, queries: np.ndarray, k: int, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product over chunks (the reference for recall)."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    k = max(1, min(k, len(vectors)))
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
