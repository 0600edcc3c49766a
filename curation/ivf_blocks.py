"""``ivf_blocks``: an IVF partition whose probed lists are scanned as dense matmuls, for threshold graphs and kNN.

Why not FAISS's own ``IndexIVFFlat``: it scans list by list for one query at a time (SIMD dot products), while here
all queries probing a list are scored against it at once by a matrix product (BLAS or oneDNN bf16), and a threshold
graph needs every pair above the threshold, not the top-k. FAISS does the rest: the coarse quantizer is a FAISS
``IndexFlatIP`` (or ``IndexHNSWFlat``) over centroids trained by FAISS k-means, two-level (docs/curation.md).

- :meth:`BlockedIVF.range_pairs`: every (query row, base id, cosine) above a threshold among the probed lists,
  exact; :meth:`BlockedIVF.search`: a running top-k per query (retrieval), re-scored exactly.
- :class:`ListScan`: fp32 or bf16 matmuls; bf16 scores come with a rigorous error bound, and every pair within it of
  the threshold is re-scored in fp32, so a bf16 scan returns the fp32 scan's pairs.
- Base vectors are written sorted by list (fp16 ``.npy``), so a list is one contiguous read; each base vector's
  ``nprobe`` best lists are kept from the build (``base_probes``), so a self graph scores no centroid twice.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from curation.index import SearchIndex, choose_nlist, choose_nprobe, rescore
from curation.vectors import RowView, drop_resident
from infra.config.curation import IndexConfig
from infra.memory import release_free_heap
from infra.precision import resolve

ADD_CHUNK = 65_536
# |bf16 score - exact| with fp32 accumulation: both inputs rounded to 8-bit mantissas (2 x 2^-9 relative per
# product) and the output rounded once (2^-9 |s|): at most (2^-8 + 2^-9) |q| |b| < 2^-7 |q| |b|.
BF16_MARGIN = 2.0**-7
RESIDENT_LISTS = 64  # lists scanned between two drops of memory-mapped pages from the resident set (kNN: the
# list file's; self graph: the base vectors')


@dataclass
class ListScan:
    """Scores of the queries probing a list against its members: fp32, or bf16 (native on AVX512-BF16 / AMX CPUs)
    with exact fp32 re-scoring of every pair that comes within :data:`BF16_MARGIN` of the cut. Lists are stored in
    the scan's dtype family: bf16 bits (uint16) for bf16 scans, fp16 for fp32 scans."""

    precision: str = "fp32"
    scanned: int = 0  # (query, base vector) pairs scored: the search work, independent of the machine

    @property
    def storage(self) -> type:
        return np.uint16 if self.precision == "bf16" else np.float16

    def encode(self, x: np.ndarray) -> np.ndarray:
        """fp32 rows -> the list file's dtype."""
        if self.precision == "bf16":
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return x.astype(np.float16)

    def decode(self, rows: np.ndarray) -> torch.Tensor:
        """List-file rows -> a tensor in the scan dtype."""
        t = torch.from_numpy(np.ascontiguousarray(rows))
        return t.view(torch.bfloat16) if self.precision == "bf16" else t.float()

    def cast(self, q: np.ndarray) -> torch.Tensor:
        """fp32 queries -> the scan dtype."""
        qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        return qt.to(torch.bfloat16) if self.precision == "bf16" else qt

    def scores(self, q: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        self.scanned += q.shape[0] * base.shape[0]
        return q @ base.T

    def above(self, q: torch.Tensor, base: torch.Tensor, cut: torch.Tensor, bound: torch.Tensor,
              mask: tuple[torch.Tensor, torch.Tensor] | None, exact: Callable[[np.ndarray, np.ndarray], np.ndarray],
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """(row, column, exact score) of the pairs scoring above ``cut`` (r,): ``bound`` (r,) is |q| x the list's
        largest norm, ``mask`` the (rows, columns) never reported (a node and itself), ``exact(rows, columns)`` the
        fp32 scores of candidate pairs (bf16 scans)."""
        s = self.scores(q, base)  # r, m
        if mask is not None:
            s[mask] = -math.inf
        bf16 = q.dtype == torch.bfloat16
        low = cut - BF16_MARGIN * bound if bf16 else cut
        rows = torch.nonzero(s.amax(1).float() > low).ravel()  # most rows have no pair at all: skip them cheaply
        if not len(rows):
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        r, c = torch.nonzero(s[rows].float() > low[rows, None], as_tuple=True)
        r = rows[r]
        if not bf16:
            return r.numpy(), c.numpy(), s[r, c].numpy()
        r, c = r.numpy(), c.numpy()
        e = exact(r, c)
        keep = e > cut.numpy()[r]
        return r[keep], c[keep], e[keep]


class FlatQuantizer:
    """Every centroid scored: FAISS's ``IndexFlatIP`` (BLAS, exact). Kept in fp32 whatever the scan precision, so the
    lists probed (and with them every result) do not depend on the machine's bf16 support."""

    def __init__(self, centroids: np.ndarray):
        self.index = faiss.IndexFlatIP(centroids.shape[1])
        self.index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        self.scored = 0
        self.params: dict[str, Any] = {}

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.scored += len(queries) * self.ntotal
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.ntotal))


class HNSWQuantizer(FlatQuantizer):
    """FAISS's graph index over the centroids (``IndexHNSWFlat``): ~efSearch x M centroids scored per query."""

    def __init__(self, centroids: np.ndarray, m: int = 32, ef: int = 64):
        self.index = faiss.IndexHNSWFlat(centroids.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = 80
        self.index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        self.ef, self.scored, self.params = ef, 0, {"hnsw_m": m, "hnsw_ef": ef}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.index.hnsw.efSearch = max(self.ef, k)
        faiss.cvar.hnsw_stats.reset()
        out = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.ntotal))
        self.scored += int(faiss.cvar.hnsw_stats.ndis)
        return out


def train_quantizer(train: np.ndarray, nlist: int, cfg: IndexConfig, seed: int) -> Any:
    """Centroids by two-level spherical k-means (:meth:`CentroidIVF.train`), oversized cells split (:func:`balance`),
    searched as configured: every centroid (``flat``), through the groups (``ivf``) or FAISS's HNSW graph."""
    ivf = CentroidIVF.train(train, nlist, cfg.quantizer_nprobe, seed, refine=0)
    centroids = balance(train, ivf.centroids, seed) if cfg.balance else ivf.centroids
    if cfg.quantizer == "ivf":
        q = CentroidIVF.regroup(ivf.top, centroids, cfg.quantizer_nprobe)
        q.params = {"quantizer_groups": len(q.top), "quantizer_nprobe": q.nprobe}
        return q
    if cfg.quantizer == "hnsw":
        return HNSWQuantizer(centroids, cfg.hnsw_m, cfg.hnsw_ef)
    return FlatQuantizer(centroids)


def balance(x: np.ndarray, centroids: np.ndarray, seed: int, cap: float = 2.0) -> np.ndarray:
    """One Lloyd step (exact assignment of the training sample), then every cell holding more than ``cap`` x the mean
    share of the sample is split by k-means on its points into cells of about the mean share; empty cells go.

    k-means cells on power-law data are very unequal (lists of 512 on the 1M bench pool: up to 7.8x the mean,
    coefficient of variation 0.89), and a query probing its nearest lists lands in the large ones more often:
    without the split the first pass scanned 1.42x the nominal nprobe x list_size."""
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(np.ascontiguousarray(centroids, dtype=np.float32))
    a = flat.search(x, 1)[1].ravel()
    counts = np.bincount(a, minlength=len(centroids))
    mean = len(x) / len(centroids)
    parts = []
    for c in np.flatnonzero(counts):
        pts = x[a == c]
        k = math.ceil(counts[c] / mean) if counts[c] > cap * mean else 1
        parts.append(_spherical_kmeans(pts, k, 10, seed + int(c)) if k > 1 else _unit_rows(pts.mean(0, keepdims=True)))
    return np.concatenate(parts)


@dataclass(kw_only=True)
class BlockedIVF(SearchIndex):
    """IVF partition searched list by list as dense matmuls (all queries probing a list at once)."""

    lists: np.ndarray  # (n, D) base vectors grouped by list, in the scan's storage dtype (memory-mapped)
    ids: np.ndarray  # (n,) base id of each row of ``lists``
    pos: np.ndarray  # (n,) row of ``lists`` holding each base id
    bounds: np.ndarray  # (nlist + 1,) row range of each list
    norms: np.ndarray  # (nlist,) largest vector norm per list (the bf16 error bound)
    base_probes: np.ndarray  # (n, nprobe) the best lists of every base vector, its own first ((n, 1) unless self_graph)
    nprobe: int = 8
    nprobe_wide: int = 0  # second pass: lists probed for queries with a pair above the threshold (0: none)
    scan: ListScan = field(default_factory=ListScan)

    @property
    def scanned(self) -> int:
        return self.scan.scanned

    @classmethod
    def build(cls, vectors: RowView, cfg: IndexConfig, seed: int, work_dir: Path | None,
              self_graph: bool = False) -> BlockedIVF:  # fmt: skip
        n, dim = len(vectors), vectors.dim
        rng = np.random.default_rng(seed)
        nlist = choose_nlist(n, cfg)
        train = vectors.take(np.sort(rng.choice(n, min(n, cfg.train_size, 64 * nlist), replace=False)))
        quantizer = train_quantizer(train, nlist, cfg, seed)
        nlist = quantizer.ntotal
        nprobe = choose_nprobe(nlist, cfg)
        work_dir = Path(work_dir or tempfile.mkdtemp(prefix="ivf_blocks_"))
        work_dir.mkdir(parents=True, exist_ok=True)
        keep = nprobe if self_graph else 1  # a self graph probes from each vector's own lists; otherwise: assignment
        probes = np.lib.format.open_memmap(work_dir / "ivf_base_probes.npy", "w+", np.int32, (n, keep))
        for s, b in vectors.chunks():
            probes[s : s + len(b)] = quantizer.search(b, keep)[1]
        order = np.argsort(probes[:, 0], kind="stable")
        bounds = np.searchsorted(probes[:, 0][order], np.arange(nlist + 1))
        scan = ListScan(resolve(cfg.scan_precision))
        lists = np.lib.format.open_memmap(work_dir / "ivf_lists.npy", "w+", scan.storage, (n, dim))
        norms = np.zeros(nlist, np.float32)
        for s in range(0, n, ADD_CHUNK):
            block = vectors.take(order[s : s + ADD_CHUNK])
            lists[s : s + len(block)] = scan.encode(block)
            np.maximum.at(norms, probes[order[s : s + ADD_CHUNK], 0], np.sqrt(np.einsum("nd,nd->n", block, block)))
        # The build read every base vector and wrote every list: both leave the resident set (the page cache keeps
        # them), so the search's peak holds only what it touches.
        drop_resident(lists)
        vectors.drop_resident()
        pos = np.empty(n, np.int64)
        pos[order] = np.arange(n)
        wide = min(cfg.nprobe_wide, nlist) if cfg.nprobe_wide > nprobe else 0
        params = {"kind": "ivf_blocks", "n": n, "nlist": nlist, "nprobe": nprobe, "nprobe_wide": wide,
                  "train_size": len(train), "list_size": cfg.list_size, "quantizer": cfg.quantizer,
                  "scan_precision": scan.precision, **quantizer.params}  # fmt: skip
        return cls(index=quantizer, kind="ivf_blocks", vectors=vectors, params=params, lists=lists, ids=order,
                   pos=pos, bounds=bounds, norms=norms, base_probes=probes, nprobe=nprobe, nprobe_wide=wide,
                   refine_factor=cfg.refine_factor, scan=scan)  # fmt: skip

    def close(self) -> None:
        """Removes the list and probe files (a copy of the base vectors) from the work folder; hands the freed heap
        back to the OS."""
        files = [Path(a.filename) for a in (self.lists, self.base_probes) if isinstance(a, np.memmap)]
        self.lists, self.base_probes = np.zeros((0, 0), np.uint16), np.zeros((0, 0), np.int32)
        for f in files:
            f.unlink(missing_ok=True)
        release_free_heap()

    def probe(self, queries: np.ndarray, nprobe: int) -> np.ndarray:
        """(m, nprobe) list ids per query, best first (the coarse quantizer)."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), nprobe)[1]

    def wide_probes(self, queries: np.ndarray) -> np.ndarray:
        """The second pass's lists: the ``nprobe_wide`` best minus the first pass's ``nprobe`` (-1 there)."""
        wide = self.probe(queries, self.nprobe_wide)
        wide[:, : self.nprobe] = -1  # exact top-k: the first nprobe are the first pass's
        return wide

    def _by_list(self, probes: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(list, query rows probing it) per probed non-empty list; rows sorted."""
        rows = np.broadcast_to(np.arange(len(probes))[:, None], probes.shape).ravel()
        lists = probes.ravel().astype(np.int64)
        order = np.argsort(lists * len(probes) + rows)
        lists, rows = lists[order], rows[order]
        cuts = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1], True])
        for a, b in itertools.pairwise(cuts):
            lst = int(lists[a])
            if lst >= 0 and self.bounds[lst + 1] > self.bounds[lst]:
                yield lst, rows[a:b]

    def _members(self, lst: int) -> tuple[int, torch.Tensor]:
        lo, hi = int(self.bounds[lst]), int(self.bounds[lst + 1])
        return lo, self.scan.decode(self.lists[lo:hi])  # one contiguous read

    def _scan_list(self, lst: int, q: torch.Tensor, threshold: float, offsets: np.ndarray | None,
                   nodes: np.ndarray | None, exact_q: Callable[[np.ndarray], np.ndarray],
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """Pairs (row of ``q``, base id, score - offset) above ``threshold`` in list ``lst``: ``q`` in the scan dtype,
        ``exact_q(rows)`` their fp32 vectors, ``nodes`` the base id of each row in a self graph (a row and its own
        base vector are never paired)."""
        lo, base = self._members(lst)
        cut = torch.full((len(q),), float(threshold))
        if offsets is not None:
            cut += torch.from_numpy(np.asarray(offsets, np.float32))
        mask = None
        if nodes is not None:
            own = self.pos[nodes] - lo
            hit = np.flatnonzero((own >= 0) & (own < base.shape[0]))
            mask = (torch.from_numpy(hit), torch.from_numpy(own[hit]))
        bound = torch.linalg.vector_norm(q, dim=1, dtype=torch.float32) * float(self.norms[lst])

        def exact(r: np.ndarray, c: np.ndarray) -> np.ndarray:
            return np.einsum("md,md->m", exact_q(r), self.vectors.take(self.ids[lo + c])).astype(np.float32)

        r, c, s = self.scan.above(q, base, cut, bound, mask, exact)
        return r, self.ids[lo + c], (s - (cut.numpy()[r] - threshold)).astype(np.float32)

    def range_pairs(self, queries: np.ndarray, threshold: float, offsets: np.ndarray | None = None,
                    probes: np.ndarray | None = None, nodes: np.ndarray | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """(query row, base id, cosine - offset) for every pair above ``threshold`` in the probed lists.

        ``probes``: (m, p) list ids per query (-1: none), by default the ``nprobe`` best; ``nodes``: the base id of
        each query row in a self graph (that pair is never reported)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        q_scan = self.scan.cast(q)
        probes = self.probe(q, self.nprobe) if probes is None else probes
        out = []
        for lst, rows in self._by_list(probes):
            r, d, s = self._scan_list(lst, q_scan.index_select(0, torch.from_numpy(rows)), threshold,
                                      offsets[rows] if offsets is not None else None,
                                      nodes[rows] if nodes is not None else None, lambda r, rows=rows: q[rows[r]])  # fmt: skip
            out.append((rows[r], d, s))
        return _concat(out)

    def self_pairs(self, threshold: float, offsets: np.ndarray | None = None,
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:  # fmt: skip
        """The first pass of a self graph whose queries are the base vectors themselves: (query id, base id, cosine -
        offset) above ``threshold`` among each vector's ``nprobe`` lists from the build, yielded list by list.

        All (list, query) pairs are sorted by list once, so every list is read once and scored against all of its
        queries in one matmul (as many matmuls as lists, each as large at any n); the queries are gathered from the
        list file in the scan dtype. Memory: the sorted pairs (8 bytes x n x nprobe) and one list's queries."""
        p = self.base_probes.shape[1]
        flat = np.asarray(self.base_probes).ravel()
        order = np.argsort(flat, kind="stable")  # by list, then by query id
        cuts = np.searchsorted(flat[order], np.arange(len(self.bounds)))
        del flat
        for lst in range(len(self.bounds) - 1):
            if lst % RESIDENT_LISTS == RESIDENT_LISTS - 1:  # the exact re-scoring reads base vectors all over the
                self.vectors.drop_resident()  # pool, a few per list: they need not stay mapped
            rows = np.sort(self.pos[order[cuts[lst] : cuts[lst + 1]] // p])  # list-file rows of its queries
            if not len(rows) or self.bounds[lst + 1] == self.bounds[lst]:
                continue
            qids = self.ids[rows]
            r, d, s = self._scan_list(lst, self.scan.decode(self.lists[rows]), threshold,
                                      offsets[qids] if offsets is not None else None, qids,
                                      lambda r, qids=qids: self.vectors.take(qids[r]))  # fmt: skip
            yield qids[r], d, s

    def search(self, queries: np.ndarray, k: int, chunk: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the k best base vectors among each query's ``nprobe`` lists, exact, best first."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, len(self.ids)))
        sims, ids = np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        for s in range(0, len(q), chunk):
            sims[s : s + chunk], ids[s : s + chunk] = self._search(q[s : s + chunk], k)
        return sims, ids

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q_scan = self.scan.cast(queries)
        kk = k * self.refine_factor if self.scan.precision == "bf16" else k  # bf16 ranks; exact scores pick the k
        best_s = torch.full((len(q_scan), kk), -math.inf)
        best_i = torch.full((len(q_scan), kk), -1, dtype=torch.int64)
        ids = torch.from_numpy(self.ids)
        probes = self.probe(queries, self.nprobe)
        # Each query's nearest list first: its k-th best score then rises early, and later lists skip the top-k
        # of every query they cannot improve.
        pairs = itertools.chain(self._by_list(probes[:, :1]), self._by_list(probes[:, 1:]))
        for i, (lst, rows) in enumerate(pairs):
            if i % RESIDENT_LISTS == RESIDENT_LISTS - 1:  # lists are read in order, each once per pass: only the
                drop_resident(self.lists)  # last few stay mapped (a re-read is a minor fault from the page cache)
            rt = torch.from_numpy(rows)
            lo, base = self._members(lst)
            s = self.scan.scores(q_scan.index_select(0, rt), base)
            better = torch.nonzero(s.amax(1).float() > best_s[rt, -1]).ravel()  # rows this list can improve
            if not len(better):
                continue
            rt = rt[better]
            top_s, top_c = torch.topk(s[better].float(), min(kk, base.shape[0]), dim=1)
            cand_s = torch.cat([best_s.index_select(0, rt), top_s], 1)
            cand_i = torch.cat([best_i.index_select(0, rt), ids[lo + top_c]], 1)
            keep_s, at = torch.topk(cand_s, kk, dim=1)
            best_s[rt], best_i[rt] = keep_s, torch.gather(cand_i, 1, at)
        if self.scan.precision == "bf16":
            return rescore(queries, best_i.numpy(), self.vectors, k)
        return best_s.numpy(), best_i.numpy()


def _concat(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


@dataclass
class CentroidIVF:
    """Coarse quantizer over many centroids: an IVF over the centroids themselves.

    Trained two-level: ``G`` ~ sqrt(nlist) group centres by spherical k-means on the training sample, then each
    group's training points are clustered into a share of the ``nlist`` centroids proportional to their number
    (as ``faiss.contrib.clustering.two_level_clustering``): training costs ~2 sqrt(nlist) per training point and
    iteration instead of nlist. Searched two-level (``quantizer: ivf``), a query scores the G group centres, then
    only the centroids of its ``nprobe`` best groups: G + nprobe * nlist / G dot products instead of nlist.
    The split cuts fine cells at group borders; ``refine`` Lloyd steps with assignment through the two-level search
    undo most of that. Centroid ids are numbered group by group: group g owns ids ``bounds[g]:bounds[g+1]``.
    """

    top: np.ndarray  # (G, D) group centres
    centroids: np.ndarray  # (nlist, D) sorted by group
    bounds: np.ndarray  # (G + 1,)
    nprobe: int
    scored: int = 0  # (query, centre or centroid) pairs scored so far
    params: dict[str, Any] = field(default_factory=dict)

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

    @classmethod
    def regroup(cls, top: np.ndarray, centroids: np.ndarray, nprobe: int) -> CentroidIVF:
        """The centroids grouped under their nearest group centre (empty groups dropped, centres re-averaged)."""
        g = (centroids @ top.T).argmax(1)
        order = np.argsort(g, kind="stable")
        keep = np.unique(g)
        bounds = np.searchsorted(g[order], [*keep.tolist(), len(top)]).astype(np.int64)
        bounds[-1] = len(centroids)
        sums = np.stack([centroids[order[a:b]].sum(0) for a, b in itertools.pairwise(bounds)])
        return cls(_unit_rows(sums), np.ascontiguousarray(centroids[order]), bounds, max(1, min(nprobe, len(keep))))

    def search(self, queries: np.ndarray, k: int, block: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the best k centroids among the ``nprobe`` best groups; ids -1 (sim -inf) where fewer exist.

        Queries probing a group are scored against its centroids in one matmul; each keeps its k best per probed
        group, then the k best of those."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        top, cents = torch.from_numpy(self.top), torch.from_numpy(self.centroids)
        p = self.nprobe
        sims, ids = np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        rows_per = max(1, block // (p * k))
        for s in range(0, len(q), rows_per):
            qs = q[s : s + rows_per]
            probe = torch.topk(qs @ top.T, min(p, len(top)), dim=1).indices.numpy()  # r, p
            self.scored += len(qs) * len(top)
            cand_s = torch.full((len(qs), probe.shape[1], k), -math.inf)
            cand_i = torch.full((len(qs), probe.shape[1], k), -1, dtype=torch.int64)
            slots = probe.ravel()
            order = np.argsort(slots, kind="stable")
            cuts = np.searchsorted(slots[order], np.arange(len(self.top) + 1))
            for g in np.unique(slots):
                sel = order[cuts[g] : cuts[g + 1]]  # flat (row, probe-rank) slots probing group g
                r, j = torch.from_numpy(sel // probe.shape[1]), torch.from_numpy(sel % probe.shape[1])
                lo, hi = int(self.bounds[g]), int(self.bounds[g + 1])
                v, i = torch.topk(torch.index_select(qs, 0, r) @ cents[lo:hi].T, min(k, hi - lo), dim=1)
                cand_s[r, j, : v.shape[1]], cand_i[r, j, : v.shape[1]] = v, i + lo
                self.scored += len(sel) * (hi - lo)
            kk = min(k, cand_s.shape[1] * k)
            v, at = torch.topk(cand_s.reshape(len(qs), -1), kk, dim=1)
            sims[s : s + len(qs), :kk] = v.numpy()
            ids[s : s + len(qs), :kk] = np.where(np.isfinite(v.numpy()), torch.gather(cand_i.reshape(len(qs), -1), 1, at).numpy(), -1)
        return sims, ids


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _spherical_kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    if k >= len(x):
        return _unit_rows(x)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x))
    return km.centroids
