"""FAISS indexes chosen by scale, exact re-scoring, brute-force reference search and measured recall.

All vectors are L2-normalised, so inner product = cosine (paper §A.2). ``flat`` is exact; ``ivf_flat`` stores full
vectors in inverted lists (exact scores, approximate candidates); ``ivfpq`` stores PQ codes (paper §3: GPU IVF-PQ
at 1B scale) and its candidates are re-scored exactly from the stored vectors, so no threshold or similarity
downstream ever sees a PQ-approximate score. A FAISS GPU build with a visible device is used when allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from curation.vectors import RowView
from infra.config.curation import IndexConfig
from infra.memory import release_free_heap

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


def choose_nprobe(nlist: int, cfg: IndexConfig) -> int:
    """ceil(``probe_share`` x nlist) if set, else ``nprobe``; at least 1 and at most nlist."""
    nprobe = math.ceil(cfg.probe_share * nlist) if cfg.probe_share is not None else cfg.nprobe
    return int(max(1, min(nprobe, nlist)))


@dataclass
class SearchIndex:
    index: faiss.Index
    kind: str
    vectors: RowView
    refine_factor: int = 1
    params: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Releases files the index keeps on disk (none for the FAISS kinds)."""

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


def build_index(vectors: RowView, cfg: IndexConfig, seed: int = 0, work_dir: Path | None = None,
                self_graph: bool = False) -> SearchIndex:  # fmt: skip
    """An index over ``vectors`` (memory-mapped rows are added chunk by chunk). ``self_graph``: the vectors will query
    the index themselves (an ``ivf_blocks`` index then keeps each vector's ``nprobe`` lists from the build).

    What earlier steps freed goes back to the OS first (:func:`infra.memory.release_free_heap`), so this index's
    peak does not come on top of their heap."""
    release_free_heap()
    n, dim = len(vectors), vectors.dim
    kind = choose_kind(n, cfg)
    if kind == "ivf_blocks":
        from curation.ivf_blocks import BlockedIVF  # it builds on this module's SearchIndex

        return BlockedIVF.build(vectors, cfg, seed, work_dir, self_graph)
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
        index.nprobe = choose_nprobe(nlist, cfg)
        params.update(nlist=nlist, nprobe=index.nprobe, train_size=train_n)
    if cfg.use_gpu == "auto" and gpu_available():
        index = faiss.index_cpu_to_all_gpus(index)
        params["gpu"] = True
    for _, block in vectors.chunks(ADD_CHUNK):
        index.add(np.ascontiguousarray(block))
    return SearchIndex(index, kind, vectors, cfg.refine_factor if kind == "ivfpq" else 1, params)


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
