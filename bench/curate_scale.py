"""Scale benchmark of the curation core on synthetic embeddings: self-dedup graph, retrieval, hierarchical k-means.

    OMP_WAIT_POLICY=PASSIVE python bench/curate_scale.py --n 250000,1000000   # the issue's goals and growth
    python bench/curate_scale.py --n 100000 --dedup-index nprobe=4,nprobe_wide=0   # a variant of the index

Every size in ``--n`` runs the same steps in this process, one after the other; the run ends with the growth of
every step's seconds (and CPU seconds: less sensitive to other load on the machine) and the change of every
recall between consecutive sizes. Each step prints wall seconds, CPU seconds of this process, peak RSS (sampled
from /proc every 20 ms) and the 1-minute load average at its end (other work on the machine distorts seconds).

Data (fp16 shards on disk, memory-mapped): ``n`` unit vectors in ``dim`` dimensions drawn around ``n/50`` cluster
centres whose sizes follow a power law (a few huge concepts, a long tail), with a per-cluster spread (pairwise
cosine 0.15-0.4 inside a cluster), plus planted near-duplicate groups (2-8 copies of one image at cosine 0.8-0.95
to it) covering 2% of the pool.

Steps per size:
1. dedup graph: the dedup stage's configured index (``DedupConfig().index``, ``ivf_blocks`` above ``flat_max``),
   k=64 neighbours with cosine > 0.6 per vector, union-find components; planted groups recovered (all members in
   one component) and false merges (components joining images of different planted groups or unplanted images);
2. dedup recall: the graph's edge recall against brute force on 1,500 nodes (1,000 of planted groups, 500 at
   random), the same measure as the stage's recorded ``extra.recall``;
3. retrieval: the retrieval stage's configured index (``RetrieveConfig().index``), N=4 neighbours of 10,000 seed
   queries (perturbed pool points of 200 random concepts);
4. retrieval recall: recall@4 against brute force on 1,000 of those queries;
5. hierarchical k-means: 3 levels, level 1 fitted on 50 points per cluster (k-means++ on 25 per cluster) then every
   point assigned; resampling on levels 2-3 (10 steps, 5 and 3 points per cluster); balanced sampling of n/4.
   ``--kmeans-levels fixed`` (default): the cluster counts of ``--levels`` whatever n (as a corpus configuration
   fixes them); ``per_point``: n/500, n/5000, n/50000 clusters. Achieved assignment GFLOP/s against the matmul peak.
"Curation" is steps 1, 3 and 5; recall measurements (2, 4) and data generation are not part of it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

# Shared 2-core machines: OpenMP threads that spin while waiting (the default) collapse under oversubscription
# (FAISS PQ training measured 20.8 s -> 6.5 s with passive waiting); set before torch/faiss load their runtimes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import resource
import shutil
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

from curation.graph import QueryViews, UnionFind, edge_recall, exact_edges, knn_edges
from curation.index import build_index, exact_search
from curation.kmeans import FlopCounter
from curation.rebalance import balanced_sample, hierarchical_kmeans
from curation.vectors import RowView, VectorStore, write_vectors
from infra.config.curation import DedupConfig, IndexConfig, RebalanceConfig, RetrieveConfig
from infra.cpus import cpus

GIB = 1 << 30
CURATION = ("dedup_graph", "retrieval", "hierarchical_kmeans")


def rss_parts() -> dict[str, int]:
    """VmRSS and its parts (bytes): RssAnon (heap: arrays, tensors) and RssFile (memory-mapped files: the vector
    store, index list files, and the libraries' code)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def rss_bytes() -> int:
    return rss_parts().get("VmRSS", 0)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Step:
    """Wall time, CPU time and peak RSS of a block (RSS sampled by a thread)."""

    rows: ClassVar[list[dict]] = []

    def __init__(self, name: str, n: int | None = None):
        self.name, self.n, self.stop = name, n, threading.Event()
        self.at_peak = rss_parts()
        self.peak = self.at_peak.get("VmRSS", 0)

    def _sample(self) -> None:
        while not self.stop.wait(0.02):
            parts = rss_parts()
            if parts.get("VmRSS", 0) > self.peak:
                self.peak, self.at_peak = parts["VmRSS"], parts

    @contextmanager
    def run(self):
        t = threading.Thread(target=self._sample, daemon=True)
        t.start()
        start, cpu = time.perf_counter(), cpu_seconds()
        info: dict = {}
        try:
            yield info
        finally:
            self.stop.set()
            t.join()
            row = {"step": self.name, "n": self.n, "seconds": round(time.perf_counter() - start, 1),
                   "cpu_seconds": round(cpu_seconds() - cpu, 1), "peak_rss_gib": round(self.peak / GIB, 2),
                   "peak_rss_anon_gib": round(self.at_peak.get("RssAnon", 0) / GIB, 2),
                   "peak_rss_file_gib": round(self.at_peak.get("RssFile", 0) / GIB, 2),
                   "load": round(os.getloadavg()[0], 1), **info}  # fmt: skip
            Step.rows.append(row)
            print(json.dumps(row), flush=True)


def matmul_peak(dtype: torch.dtype, m: int = 16_384, k: int = 256, n: int = 2048, reps: int = 3,
                min_seconds: float = 2.0) -> float:  # fmt: skip
    """FLOP/s of an assignment-shaped matmul (m x k) @ (k x n): the best of at least ``reps`` runs and ``min_seconds``.

    The default shape is the level-1 assignment block (``curation.kmeans`` chunks 2^25 / k rows against k = 2000
    centroids). Timing a few runs only under-reads the peak on a shared or frequency-scaling CPU."""
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
    copies = copies.astype(np.float16)
    for i, s in enumerate(range(0, n, shard)):  # shard i: rows s.. of base followed by copies
        part = np.concatenate([base[s : s + shard], copies[max(0, s - len(base)) : max(0, s + shard - len(base))]])
        paths.append(write_vectors(out / f"{i:05d}.npy", part))
    del base, copies
    return VectorStore(paths), cluster, group


def overrides(text: str) -> dict:
    """``key=value,key=value`` -> a dict of JSON values (bare words stay strings)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def index_label(p: dict) -> str:
    if p.get("kind") != "ivf_blocks":
        return json.dumps(p)
    wide = f", {p['nprobe_wide']} for nodes with an edge" if p.get("nprobe_wide") else ""
    return (f"ivf_blocks {p['nlist']} lists of ~{p['n'] / p['nlist']:.0f} ({p['quantizer']} quantizer), "
            f"{p['nprobe']} probed{wide}, {p['scan_precision']} scan")  # fmt: skip


def dedup_graph(store: VectorStore, group: np.ndarray, cfg: IndexConfig, work: Path) -> None:
    n = len(store)
    with Step("dedup_graph", n).run() as info:
        t, c = time.perf_counter(), cpu_seconds()
        idx = build_index(RowView(store), cfg, seed=0, work_dir=work, self_graph=True)
        build_s, build_cpu = time.perf_counter() - t, cpu_seconds() - c
        scored = getattr(idx.index, "scored", 0)
        edges = knn_edges(idx, QueryViews(store), k=64, threshold=0.6, view0_is_base=True, chunk=131_072)
        uf = UnionFind(n)
        uf.union_edges(edges.src, edges.dst)
        labels = uf.labels()
        work_per = {"scanned_per_vector": round(getattr(idx, "scanned", 0) / n, 1),
                    "quantizer_pairs_per_vector": round(getattr(idx.index, "scored", 0) / n, 1),
                    "quantizer_pairs_per_vector_search": round((getattr(idx.index, "scored", 0) - scored) / n, 1)}  # fmt: skip
        planted = group >= 0
        per_group = np.unique(np.stack([group[planted], labels[planted]], 1), axis=0)  # one component per group
        recovered = np.bincount(per_group[:, 0]) == 1
        info.update(build_seconds=round(build_s, 1), build_cpu_seconds=round(build_cpu, 1), edges=len(edges),
                    components=len(np.unique(labels)), planted_groups=len(recovered),
                    planted_groups_recovered=round(float(recovered.mean()), 4), **false_merges(labels, group),
                    **work_per, index=index_label(idx.params), k=64, threshold=0.6)  # fmt: skip
        idx.close()  # as the dedup stage does
    with Step("dedup_recall", n).run() as info:  # the same graph by brute force on 1,500 nodes
        rng = np.random.default_rng(2)
        planted_nodes = np.flatnonzero(group >= 0)
        nodes = np.union1d(rng.choice(planted_nodes, min(1000, len(planted_nodes)), replace=False),
                           rng.choice(n, min(500, n), replace=False))  # fmt: skip
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


def retrieval(store: VectorStore, cluster: np.ndarray, cfg: IndexConfig, seed: int, work: Path) -> None:
    n = len(store)
    rng = np.random.default_rng(seed + 1)
    concepts = rng.choice(np.unique(cluster), 200, replace=False)  # seed queries: perturbed points of 200 concepts
    q = store.take(rng.choice(np.flatnonzero(np.isin(cluster, concepts)), 10_000))
    q = unit(q + 0.3 * unit(rng.standard_normal(q.shape).astype(np.float32))).astype(np.float32)
    with Step("retrieval", n).run() as info:
        t = time.perf_counter()
        idx = build_index(RowView(store), cfg, seed=0, work_dir=work)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        _sims, ids = idx.search(q, 4)
        per_image = np.bincount(ids[ids >= 0].ravel())
        info.update(build_seconds=round(build_s, 1), search_seconds=round(time.perf_counter() - t, 1), queries=len(q),
                    n_neighbors=4, retrieved=int((per_image > 0).sum()), collisions=int((per_image > 1).sum()),
                    scanned_per_query=round(getattr(idx, "scanned", 0) / len(q)), index=index_label(idx.params))  # fmt: skip
    with Step("retrieval_recall", n).run() as info:
        _s, exact = exact_search(RowView(store), q[:1000], 4)
        hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(ids[:1000], exact, strict=True)]
        info.update(queries=1000, recall_at_4=round(float(np.mean(hits)) / 4, 4))
    idx.close()  # as the retrieval stage does


def hierarchical(store: VectorStore, precision: str, levels: list[int] | None) -> FlopCounter:
    n = len(store)
    k = levels or [max(n // 500, 2), max(n // 5000, 2), max(n // 50000, 2)]
    cfg = RebalanceConfig(n_clusters=k, n_resampling_steps=[1, 10, 10], sample_sizes=[1, 5, 3], n_iter=10,
                          fit_sample=50 * k[0], init_sample=25 * k[0], target_size=n // 4, precision=precision)  # fmt: skip
    counter = FlopCounter()
    with Step("hierarchical_kmeans", n).run() as info:
        levels = hierarchical_kmeans(RowView(store), cfg, seed=0, counter=counter)
        sel = balanced_sample(levels, cfg.target_size, seed=0)
        sizes = np.bincount(levels[0].assign, minlength=k[0])
        info.update(levels=k, selected=len(sel), assignment_gflop=round(counter.flops / 1e9, 1),
                    assignment_seconds=round(counter.seconds, 1), assignment_gflops_per_s=round(counter.rate / 1e9, 1),
                    precision=precision, level1_cluster_size_max=int(sizes.max()), level1_cluster_size_median=int(np.median(sizes)))  # fmt: skip
    return counter


def run_size(n: int, args: argparse.Namespace, precision: str, root: Path) -> FlopCounter:
    out = root / f"n{n}"
    out.mkdir(parents=True, exist_ok=True)
    with Step("generate", n).run() as info:
        store, cluster, group = generate(out, n, args.dim, args.seed)
        info.update(dim=args.dim, shards=len(store.paths), bytes_on_disk=sum(p.stat().st_size for p in store.paths))
    steps = set(args.steps.split(","))
    if "dedup" in steps:
        dedup_cfg = DedupConfig().index.model_copy(update={"kind": "ivf_blocks", **overrides(args.dedup_index)})
        dedup_graph(store, group, IndexConfig.model_validate(dedup_cfg.model_dump()), out / "dedup")
    if "retrieval" in steps:
        retrieve_cfg = RetrieveConfig().index.model_copy(update={"kind": "ivf_blocks", **overrides(args.retrieve_index)})
        retrieval(store, cluster, IndexConfig.model_validate(retrieve_cfg.model_dump()), args.seed, out / "retrieve")
    counter = FlopCounter()
    if "kmeans" in steps:
        levels = [int(v) for v in args.levels.split(",")] if args.kmeans_levels == "fixed" else None
        counter = hierarchical(store, precision, levels)
    del store
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return counter


def summary(n: int) -> dict:
    rows = {r["step"]: r for r in Step.rows if r["n"] == n}
    steps = [s for s in CURATION if s in rows]
    get = {"dedup_graph": ("planted_groups_recovered", "false_merge_components", "images_in_false_merges",
                           "scanned_per_vector", "quantizer_pairs_per_vector"),
           "dedup_recall": ("recall",), "retrieval_recall": ("recall_at_4",)}  # fmt: skip
    out = {"n": n, "curation_seconds": round(sum(rows[s]["seconds"] for s in steps), 1),
           "curation_cpu_seconds": round(sum(rows[s]["cpu_seconds"] for s in steps), 1),
           "total_seconds": round(sum(r["seconds"] for r in rows.values()), 1),
           "peak_rss_gib": max((rows[s]["peak_rss_gib"] for s in steps), default=0.0),  # generate and recalls apart
           "peak_rss_gib_all_steps": max(r["peak_rss_gib"] for r in rows.values())}  # fmt: skip
    for step in steps:
        out[f"{step}_seconds"], out[f"{step}_cpu_seconds"] = rows[step]["seconds"], rows[step]["cpu_seconds"]
    for step, keys in get.items():
        if step in rows:
                out.update({("edge_recall" if k == "recall" else k): rows[step][k] for k in keys})
    return out


def growth(a: dict, b: dict) -> dict:
    """b / a for seconds and work, b - a for recalls and merges."""
    g = {"from_n": a["n"], "to_n": b["n"], "points": round(b["n"] / a["n"], 2)}
    for key, va in a.items():
        vb = b.get(key)
        if key == "n" or not isinstance(va, (int, float)):
            continue
        if vb is None:
            continue
        if key.endswith(("seconds", "per_vector", "rss_gib")):
            g[f"{key}_x"] = round(vb / va, 2) if va else None
        else:
            g[f"{key}_change"] = round(vb - va, 4)
    return g


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="1000000", help="pool sizes, comma-separated (e.g. 250000,1000000)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="scratch folder, kept (default: a temp dir, removed)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="k-means assignment matmul dtype; auto picks the faster one measured first")
    p.add_argument("--dedup-index", default="", help="overrides of the dedup stage's index, e.g. nprobe=4,list_size=1024")
    p.add_argument("--retrieve-index", default="", help="overrides of the retrieval stage's index, e.g. nprobe=128")
    p.add_argument("--kmeans-levels", choices=["fixed", "per_point"], default="fixed",
                   help="fixed: the cluster counts of --levels whatever n; per_point: n/500, n/5000, n/50000")
    p.add_argument("--levels", default="2000,200,20", help="clusters per level (--kmeans-levels fixed)")
    p.add_argument("--steps", default="dedup,retrieval,kmeans",
                   help="which curation steps to run (comma-separated; all three for the issue's curation time)")
    args = p.parse_args()
    sizes = [int(float(v)) for v in args.n.split(",")]
    torch.set_num_threads(cpus())  # the CPUs this process may use (a container quota included)
    root = args.out or Path(tempfile.mkdtemp(prefix="curate_scale_"))
    with Step("matmul_peak").run() as info:
        peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16, m=1024, n=1024, reps=1, min_seconds=0)
        if peak16 > 0.5 * peak32:  # a native bf16 path: measure it properly (without one it can take minutes)
            peak16 = matmul_peak(torch.bfloat16)
        info.update(fp32_gflops_per_s=round(peak32 / 1e9, 1), bf16_gflops_per_s=round(peak16 / 1e9, 1))
    precision = args.precision if args.precision != "auto" else ("bf16" if peak16 > peak32 else "fp32")
    counters = [run_size(n, args, precision, root) for n in sizes]
    with Step("matmul_peak_again").run() as info:  # contention varies: the peak is the best of both measurements
        again = matmul_peak(torch.float32 if precision == "fp32" else torch.bfloat16)
        peak = max(again, peak32 if precision == "fp32" else peak16)
        info.update(gflops_per_s=round(again / 1e9, 1), precision=precision, peak_gflops_per_s=round(peak / 1e9, 1),
                    kmeans_assignment_utilisation=[round(c.rate / peak, 3) for c in counters])  # fmt: skip
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)
    report(sizes)


def report(sizes: list[int]) -> None:
    sums = [summary(n) for n in sizes]
    print("\n| n | step | seconds | CPU seconds | peak RSS GiB | load | notes |\n|---|---|---|---|---|---|---|")
    for r in Step.rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("step", "n", "seconds", "cpu_seconds", "peak_rss_gib", "load"))
        print(f"| {r['n'] or ''} | {r['step']} | {r['seconds']} | {r['cpu_seconds']} | {r['peak_rss_gib']} | {r['load']} | {notes} |")
    for s in sums:
        print(json.dumps({"summary": s}), flush=True)
    for a, b in itertools.pairwise(sums):
        print(json.dumps({"growth": growth(a, b)}), flush=True)
    print(json.dumps({"peak_rss_gib_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
                      "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
