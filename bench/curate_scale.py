"""Scale benchmark of the curation core on synthetic embeddings: self-dedup graph, retrieval, hierarchical k-means.

    python bench/curate_scale.py --n 1000000            # the issue's target: <= 15 min, peak RSS <= 6 GiB
    python bench/curate_scale.py --n 250000             # the same settings, for the growth factor
    python bench/curate_scale.py --n 250000 --dedup-lists sqrt --kmeans-levels per_point   # the earlier settings

Data (fp16 shards on disk, memory-mapped, generated chunk by chunk): ``n`` unit vectors in ``dim`` dimensions
drawn around ``n/50`` cluster centres whose sizes follow a power law (a few huge concepts, a long tail), with a
per-cluster spread (pairwise cosine 0.15-0.4 inside a cluster), plus planted near-duplicate groups (2-8 copies of
one image at cosine 0.8-0.95 to it) covering 2% of the pool.

Steps, each with wall time and peak RSS (sampled from /proc every 20 ms):
1. peak matmul rate of this machine in fp32 and bf16 (the physical limit the k-means rate is compared with);
2. dedup graph: IVF partition searched as matmul blocks (``ivf_blocks``, 8 lists probed), k=64 neighbours with
   cosine > 0.6 per vector, union-find components; planted-group recall and false merges; then (its own step) the
   graph's edge recall against brute force on ~300 nodes (200 of planted groups, 100 at random). ``--dedup-lists fixed`` (default): lists of
   ``--list-size`` vectors (nlist ~ n / 256) found through an IVF over the centroids (``quantizer: ivf``), so the
   work per vector does not grow with n; ``sqrt``: ~2 sqrt(n) lists and a flat quantizer (work ~ n^1.5);
3. retrieval: IVF-PQ index (~2 sqrt(n) lists, 64 probed, exact re-scoring of 32x candidates), N=4 neighbours of
   10,000 seed queries, recall@4 against brute force on 1,000 of them;
4. hierarchical k-means: 3 levels, level 1 fitted on 50 points per cluster (k-means++ on 25 per cluster) then every
   point assigned; resampling on levels 2-3 (10 steps, 5 and 3 points per cluster); balanced sampling of n/4
   points. ``--kmeans-levels fixed`` (default): the cluster counts of ``--levels`` whatever n (as a corpus
   configuration fixes them; the fit is then constant and only the assignment grows, linearly); ``per_point``:
   n/500, n/5000, n/50000 clusters (k ~ n, assignment work ~ n^2). Achieved assignment GFLOP/s against the
   measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os

# Shared 2-core machines: OpenMP threads that spin while waiting (the default) collapse under oversubscription
# (FAISS PQ training measured 20.8 s -> 6.5 s with passive waiting); set before torch/faiss load their runtimes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import resource
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curation.graph import UnionFind, edge_recall, exact_edges, knn_edges
from curation.index import build_index, choose_nlist, recall_at_k
from curation.kmeans import FlopCounter
from curation.rebalance import balanced_sample, hierarchical_kmeans
from curation.vectors import RowView, VectorStore, write_vectors
from infra.config.curation import IndexConfig, RebalanceConfig

GIB = 1 << 30


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Step:
    """Wall time and peak RSS of a block (RSS sampled by a thread; ru_maxrss as a floor)."""

    rows: ClassVar[list[dict]] = []

    def __init__(self, name: str):
        self.name, self.peak, self.stop = name, rss_bytes(), threading.Event()

    def _sample(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    @contextmanager
    def run(self):
        t = threading.Thread(target=self._sample, daemon=True)
        t.start()
        start = time.perf_counter()
        info: dict = {}
        try:
            yield info
        finally:
            self.stop.set()
            t.join()
            row = {"step": self.name, "seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(self.peak / GIB, 2), **info}
            Step.rows.append(row)
            print(json.dumps(row), flush=True)


def matmul_peak(dtype: torch.dtype, m: int = 16_384, k: int = 256, n: int = 2048, reps: int = 3,
                min_seconds: float = 2.0) -> float:  # fmt: skip
    """FLOP/s of an assignment-shaped matmul (m x k) @ (k x n): the best of at least ``reps`` runs and ``min_seconds``.

    The default shape is the level-1 assignment block (``curation.kmeans`` chunks 2^25 / k rows against k = 2000
    centroids). Timing a few runs only under-reads the peak on a shared or frequency-scaling CPU (an earlier version,
    best of 3 at 4096 x 256 x 4096, read below the k-means rate itself: utilisation 1.13)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    best, spent, done = float("inf"), 0.0, 0
    while done < reps or spent < min_seconds:
        t = time.perf_counter()
        a @ b
        took = time.perf_counter() - t
        best, spent, done = min(best, took), spent + took, done + 1
    return 2 * m * k * n / best


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate(out: Path, n: int, dim: int, seed: int, shard: int = 131_072) -> tuple[VectorStore, np.ndarray, np.ndarray]:
    """Pool shards on disk; returns (store, cluster id per point, planted group id per point or -1)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(n // 50, 10)
    centres = unit(rng.standard_normal((n_clusters, dim)).astype(np.float32))
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 1.1  # power law: concept sizes from huge to tiny
    n_dup = int(0.02 * n)
    cluster = rng.choice(n_clusters, n - n_dup, p=weights / weights.sum())
    spread = rng.uniform(np.sqrt(0.15), np.sqrt(0.4), n_clusters).astype(np.float32)  # cos(alpha) per cluster
    # Planted groups: an original (a normal point) then 1-7 copies of it.
    sizes = []
    while sum(sizes) < n_dup:
        sizes.append(int(rng.integers(1, 8)))
    sizes[-1] -= sum(sizes) - n_dup
    sizes = [s for s in sizes if s > 0]
    originals = rng.choice(n - n_dup, len(sizes), replace=False)
    group = np.full(n, -1, np.int64)
    group[originals] = np.arange(len(sizes))
    copy_of = np.repeat(originals, sizes)
    group[n - n_dup :] = group[copy_of]
    cluster = np.concatenate([cluster, cluster[copy_of]])
    paths = []
    base = np.empty((n - n_dup, dim), np.float16)
    for s in range(0, n - n_dup, shard):
        c = cluster[s : min(s + shard, n - n_dup)]
        a = spread[c][:, None]
        noise = unit(rng.standard_normal((len(c), dim)).astype(np.float32))
        base[s : s + len(c)] = unit(centres[c] * a + noise * np.sqrt(1 - a * a))
    copies = base[copy_of].astype(np.float32)
    b = rng.uniform(0.8, 0.95, (n_dup, 1)).astype(np.float32)
    copies = unit(copies * b + unit(rng.standard_normal((n_dup, dim)).astype(np.float32)) * np.sqrt(1 - b * b))
    full = np.concatenate([base, copies.astype(np.float16)])
    del base, copies
    for i, s in enumerate(range(0, n, shard)):
        paths.append(write_vectors(out / f"{i:05d}.npy", full[s : s + shard]))
    del full
    return VectorStore(paths), cluster, group


def dedup_index(n: int, lists: str, list_size: int, quantizer_nprobe: int) -> IndexConfig:
    if lists == "sqrt":  # ~2 sqrt(n) lists: on CPU the flat quantizer's training and per-query scan dominate
        nlist = 2 ** round(np.log2(2 * np.sqrt(n)))
        return IndexConfig(kind="ivf_blocks", nlist=nlist, nprobe=8, train_size=32 * nlist)
    nlist = choose_nlist(n, IndexConfig(list_size=list_size))
    return IndexConfig(kind="ivf_blocks", list_size=list_size, nprobe=8, quantizer="ivf",
                       quantizer_nprobe=quantizer_nprobe, train_size=32 * nlist)  # fmt: skip


def dedup_graph(store: VectorStore, group: np.ndarray, cfg: IndexConfig, work: Path) -> None:
    with Step("dedup_graph").run() as info:
        t = time.perf_counter()
        idx = build_index(RowView(store), cfg, seed=0, work_dir=work)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        edges = knn_edges(idx, ((s, b[:, None, :]) for s, b in store.chunks(262_144)), k=64, threshold=0.6)
        search_s = time.perf_counter() - t
        uf = UnionFind(len(store))
        uf.union_edges(edges.src, edges.dst)
        labels = uf.labels()
        p = idx.params
        n = len(store)  # work per vector, machine-independent: scored (vector, list member) and (vector, centroid) pairs
        quantizer_pairs = getattr(idx.index, "scored", 2 * n * p["nlist"])  # flat: base assignment + queries
        work = {"scanned_per_vector": round(idx.scanned / n, 1), "quantizer_pairs_per_vector": round(quantizer_pairs / n, 1)}
        del idx
        planted = group >= 0
        g, lab = group[planted], labels[planted]
        per_group = np.unique(np.stack([g, lab], 1), axis=0)  # a planted group is recovered in one component
        recovered = np.bincount(per_group[:, 0]) == 1
        quantizer = f"ivf quantizer {p['quantizer_groups']} groups, {p['quantizer_nprobe']} probed" if "quantizer_groups" in p else "flat quantizer"
        info.update(edges=len(edges), components=len(np.unique(labels)), build_seconds=round(build_s, 1),
                    search_seconds=round(search_s, 1), planted_groups=len(recovered),
                    planted_groups_recovered=round(float(recovered.mean()), 4), **false_merges(labels, group), **work,
                    index=f"IVF{p['nlist']} blocks ({len(store) / p['nlist']:.0f}/list, {quantizer}) nprobe=8, k=64, cos>0.6")  # fmt: skip
    with Step("dedup_recall").run() as info:  # the same graph by brute force on 300 nodes (planted: nearly all edges)
        rng = np.random.default_rng(2)
        planted_nodes = np.flatnonzero(group >= 0)
        nodes = np.union1d(rng.choice(planted_nodes, min(200, len(planted_nodes)), replace=False),
                           rng.choice(len(store), min(100, len(store)), replace=False))  # fmt: skip
        exact = exact_edges(RowView(store), nodes, store.take(nodes)[:, None, :], 64, 0.6)
        info.update(edge_recall(edges, exact, nodes))


def false_merges(labels: np.ndarray, group: np.ndarray) -> dict:
    """Non-trivial components whose members are not all one planted group."""
    order = np.argsort(labels, kind="stable")
    lab, grp = labels[order], group[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    sizes = np.diff(np.r_[starts, len(lab)])
    gmin, gmax = np.minimum.reduceat(grp, starts), np.maximum.reduceat(grp, starts)
    multi = sizes > 1
    bad = multi & ((gmin != gmax) | (gmin < 0))
    return {"multi_member_components": int(multi.sum()), "false_merge_components": int(bad.sum()),
            "images_in_false_merges": int(sizes[bad].sum())}  # fmt: skip


def retrieval(store: VectorStore, cluster: np.ndarray, nlist: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    with Step("retrieval").run() as info:
        cfg = IndexConfig(kind="ivfpq", nlist=nlist, nprobe=64, pq_m=32, pq_nbits=8, refine_factor=32, train_size=40 * nlist)
        idx = build_index(RowView(store), cfg, seed=0)
        # Seed queries: perturbed pool points of 200 random concepts (a curated dataset's distribution).
        concepts = rng.choice(np.unique(cluster), 200, replace=False)
        members = np.flatnonzero(np.isin(cluster, concepts))
        q = store.take(rng.choice(members, 10_000))
        q = unit(q + 0.3 * unit(rng.standard_normal(q.shape).astype(np.float32)))
        t = time.perf_counter()
        _sims, ids = idx.search(q, 4)
        search_s = time.perf_counter() - t
        per_image = np.bincount(ids[ids >= 0].ravel())
        recall = recall_at_k(idx, q[:1000], 4)
        info.update(queries=len(q), n_neighbors=4, search_seconds=round(search_s, 2), retrieved=int((per_image > 0).sum()),
                    collisions=int((per_image > 1).sum()), recall_at_4=round(recall, 4), index=f"IVF{nlist},PQ32x8 nprobe=64 refine=32")  # fmt: skip
        del idx


def hierarchical(store: VectorStore, precision: str, levels: list[int] | None) -> FlopCounter:
    n = len(store)
    k = levels or [max(n // 500, 2), max(n // 5000, 2), max(n // 50000, 2)]
    cfg = RebalanceConfig(n_clusters=k, n_resampling_steps=[1, 10, 10], sample_sizes=[1, 5, 3], n_iter=10,
                          fit_sample=50 * k[0], init_sample=25 * k[0], target_size=n // 4, precision=precision)  # fmt: skip
    counter = FlopCounter()
    with Step("hierarchical_kmeans").run() as info:
        levels = hierarchical_kmeans(RowView(store), cfg, seed=0, counter=counter)
        sel = balanced_sample(levels, cfg.target_size, seed=0)
        sizes = np.bincount(levels[0].assign, minlength=k[0])
        info.update(levels=k, selected=len(sel), assignment_gflop=round(counter.flops / 1e9, 1),
                    assignment_seconds=round(counter.seconds, 1), assignment_gflops_per_s=round(counter.rate / 1e9, 1),
                    precision=precision, level1_cluster_size_max=int(sizes.max()), level1_cluster_size_median=int(np.median(sizes)))  # fmt: skip
    return counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="scratch folder for the shards (default: a temp dir)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="k-means assignment matmul dtype; auto picks the faster one measured in step 1")
    p.add_argument("--dedup-lists", choices=["fixed", "sqrt"], default="fixed",
                   help="fixed: lists of --list-size vectors with an IVF quantizer over the centroids (work ~ n); "
                        "sqrt: ~2 sqrt(n) lists with a flat quantizer (work ~ n^1.5)")
    p.add_argument("--list-size", type=int, default=256, help="vectors per dedup list (--dedup-lists fixed)")
    p.add_argument("--quantizer-nprobe", type=int, default=16, help="centroid groups probed (--dedup-lists fixed)")
    p.add_argument("--kmeans-levels", choices=["fixed", "per_point"], default="fixed",
                   help="fixed: the cluster counts of --levels whatever n; per_point: n/500, n/5000, n/50000")
    p.add_argument("--levels", default="2000,200,20", help="clusters per level (--kmeans-levels fixed)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    out = args.out or Path(tempfile.mkdtemp(prefix="curate_scale_"))
    out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    with Step("matmul_peak").run() as info:
        peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16, m=1024, n=1024, reps=1, min_seconds=0)
        if peak16 > 0.5 * peak32:  # a native bf16 path: measure it properly (without one it can take minutes)
            peak16 = matmul_peak(torch.bfloat16)
        info.update(fp32_gflops_per_s=round(peak32 / 1e9, 1), bf16_gflops_per_s=round(peak16 / 1e9, 1))
    precision = args.precision if args.precision != "auto" else ("bf16" if peak16 > peak32 else "fp32")
    with Step("generate").run() as info:
        store, cluster, group = generate(out, args.n, args.dim, args.seed)
        info.update(n=len(store), dim=args.dim, shards=len(store.paths), bytes_on_disk=sum(p.stat().st_size for p in store.paths))
    dedup_graph(store, group, dedup_index(args.n, args.dedup_lists, args.list_size, args.quantizer_nprobe), out)
    # IVF-PQ: ~2 sqrt(n) lists (FAISS's flat quantizer: n x nlist to add, so fixed-size lists would be ~n^2 here).
    retrieval(store, cluster, 2 ** round(np.log2(2 * np.sqrt(args.n))), args.seed)
    levels = [int(v) for v in args.levels.split(",")] if args.kmeans_levels == "fixed" else None
    counter = hierarchical(store, precision, levels)
    with Step("matmul_peak_again").run() as info:  # contention varies: the peak is the best of both measurements
        again = matmul_peak(torch.float32 if precision == "fp32" else torch.bfloat16)
        peak = max(again, peak32 if precision == "fp32" else peak16)
        info.update(gflops_per_s=round(again / 1e9, 1), precision=precision,
                    kmeans_assignment_gflops_per_s=round(counter.rate / 1e9, 1), peak_gflops_per_s=round(peak / 1e9, 1),
                    kmeans_assignment_utilisation=round(counter.rate / peak, 3))  # fmt: skip
    summary = {"n": args.n, "dedup_lists": args.dedup_lists, "kmeans_levels": args.kmeans_levels,
               "total_seconds": round(time.perf_counter() - total, 1),
               "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}  # fmt: skip
    print(json.dumps(summary), flush=True)
    print("\n| step | seconds | peak RSS GiB | notes |\n|---|---|---|---|")
    for r in Step.rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("step", "seconds", "peak_rss_gib"))
        print(f"| {r['step']} | {r['seconds']} | {r['peak_rss_gib']} | {notes} |")
    print(f"| total | {summary['total_seconds']} | {summary['peak_rss_gib']} | |")


if __name__ == "__main__":
    main()
