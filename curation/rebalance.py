"""Concept rebalancing with hierarchical k-means and balanced sampling (Vo et al. 2024, arXiv 2405.15613),
re-implemented from the paper's description; the reference code is CC-BY-NC and was not read or used.

Hierarchy, bottom-up: level 1 clusters the points, level t > 1 clusters the centroids of level t-1. Each level
is k-means (k-means++ init, Lloyd), then ``steps - 1`` resampling steps: take the ``sample_size`` points closest to
each centroid (or a random subset of that size), rerun k-means on that union, and reassign every input of the
level to the new centroids. Resampling pulls centroids away from dense regions toward a uniform cover of the
support. Level 1 is fitted on a sample when the pool is larger than ``fit_sample`` and then assigned in chunks.

Balanced sampling, top-down: at each node the quota is split among its children with the largest cap x such
that sum_i min(x, size_i) <= quota (sizes count the leaf points under each child); the remainder goes +1 to
random children larger than x. At level 1 the points are drawn at random (``random``) or closest to the
centroid first (``closest``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from curation.kmeans import FlopCounter, array_chunks, assign, kmeans
from curation.vectors import RowView
from infra.config.curation import RebalanceConfig
from infra.lineage import LedgerWriter
from infra.stage import StageResult
from infra.storage import atomic_path

SELECTED = "selected.parquet"


@dataclass
class Level:
    centroids: np.ndarray  # (k, D)
    assign: np.ndarray  # (n_inputs,) cluster of each input of this level
    dist2: np.ndarray  # (n_inputs,) squared distance to that cluster's centroid


def members_by_distance(assign_: np.ndarray, dist2: np.ndarray, k: int) -> list[np.ndarray]:
    """members[c]: input indices of cluster c, closest to the centroid first (ties by index)."""
    order = np.lexsort((np.arange(len(assign_)), dist2, assign_))
    bounds = np.searchsorted(assign_[order], np.arange(k + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(k)]


def resample(members: list[np.ndarray], size: int, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Per cluster, ``size`` members: the closest ones, or a random subset of that size."""
    picked = []
    for m in members:
        if strategy == "closest" or len(m) <= size:
            picked.append(m[:size])
        else:
            picked.append(np.sort(rng.choice(m, size, replace=False)))
    return np.concatenate(picked) if picked else np.zeros(0, np.int64)


def fit_level(x: np.ndarray, k: int, steps: int, sample_size: int, cfg: RebalanceConfig, rng: np.random.Generator,
              counter: FlopCounter | None = None) -> Level:  # fmt: skip
    """k-means with resampling on the in-memory inputs of one level."""
    km = kmeans(x, k, cfg.n_iter, rng, cfg.precision, counter, init_sample=cfg.init_sample)
    for _ in range(1, steps):
        members = members_by_distance(km.assign, km.dist2, len(km.centroids))
        sub = resample(members, sample_size, cfg.resample_strategy, rng)
        fitted = kmeans(x[sub], k, cfg.n_iter, rng, cfg.precision, counter, init_sample=cfg.init_sample)
        a, d = assign(array_chunks(x), fitted.centroids, len(x), cfg.precision, counter)
        km = type(km)(fitted.centroids, a, d, float(d.sum()))
    return Level(km.centroids, km.assign, km.dist2)


def hierarchical_kmeans(points: RowView, cfg: RebalanceConfig, seed: int,
                        counter: FlopCounter | None = None) -> list[Level]:  # fmt: skip
    """Bottom-up hierarchy over a (possibly memory-mapped) point set; level 1 fitted on a sample."""
    rng = np.random.default_rng(seed)
    n = len(points)
    fit_rows = np.arange(n) if n <= cfg.fit_sample else np.sort(rng.choice(n, cfg.fit_sample, replace=False))
    data = points.take(fit_rows)
    levels = []
    for t, k in enumerate(cfg.n_clusters):
        level = fit_level(data, k, cfg.steps(t), cfg.sample_size(t), cfg, rng, counter)
        if t == 0 and len(fit_rows) < n:  # assign every point, chunk by chunk
            a, d = assign(points.chunks(), level.centroids, n, cfg.precision, counter)
            level = Level(level.centroids, a, d)
        levels.append(level)
        data = level.centroids
    return levels


def split_quota(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Quota per cluster: min(cap, size) with the largest cap that fits, remainder +1 to random larger clusters."""
    target = min(int(target), int(sizes.sum()))
    lo, hi = 0, int(sizes.max(initial=0))
    while lo < hi:  # largest cap with sum(min(cap, size)) <= target
        mid = (lo + hi + 1) // 2
        if np.minimum(sizes, mid).sum() <= target:
            lo = mid
        else:
            hi = mid - 1
    quota = np.minimum(sizes, lo)
    rest = target - int(quota.sum())
    if rest:
        bigger = np.flatnonzero(sizes > lo)
        quota[rng.choice(bigger, rest, replace=False)] += 1
    return quota


def balanced_sample(levels: list[Level], target: int, seed: int, leaf_strategy: str = "random") -> np.ndarray:
    """Sorted indices of exactly min(target, n) points, balanced top-down over the hierarchy."""
    rng = np.random.default_rng(seed)
    members = [members_by_distance(lv.assign, lv.dist2, len(lv.centroids)) for lv in levels]
    flat = [np.bincount(levels[0].assign, minlength=len(levels[0].centroids))]  # leaf points under each node
    for t in range(1, len(levels)):
        flat.append(np.array([flat[t - 1][m].sum() for m in members[t]], dtype=np.int64))

    def take(t: int, clusters: np.ndarray, quota: int) -> list[np.ndarray]:
        out = []
        for c, q in zip(clusters, split_quota(flat[t][clusters], quota, rng), strict=True):
            if q == 0:
                continue
            if t > 0:
                out.extend(take(t - 1, members[t][c], int(q)))
            elif leaf_strategy == "closest":
                out.append(members[0][c][:q])
            else:
                out.append(rng.choice(members[0][c], q, replace=False))
        return out

    top = len(levels) - 1
    picked = take(top, np.arange(len(levels[top].centroids)), target)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def cluster_paths(levels: list[Level], n: int) -> np.ndarray:
    """(n, n_levels): each point's cluster at every level."""
    if not levels:
        return np.zeros((n, 0), np.int64)
    path = [levels[0].assign]
    for lv in levels[1:]:
        path.append(lv.assign[path[-1]])
    return np.stack(path, 1)


def rebalance(meta: pd.DataFrame, points: RowView, stage_dir: Path, cfg: RebalanceConfig, seed: int) -> StageResult:
    """``meta`` (image_id, row_id, ...) is aligned with ``points``; writes the selection and its ledger."""
    n = len(meta)
    target = n if cfg.target_size is None else min(cfg.target_size, n)
    counter = FlopCounter()
    levels = hierarchical_kmeans(points, cfg, seed, counter) if n and cfg.enabled else []
    chosen = balanced_sample(levels, target, seed, cfg.leaf_strategy) if levels and target < n else np.arange(n)
    paths = cluster_paths(levels, n)
    selected = np.zeros(n, bool)
    selected[chosen] = True
    _ledger(meta, paths, selected, target, stage_dir)
    out = meta.assign(selected=selected)
    for t in range(paths.shape[1]):
        out[f"cluster_l{t + 1}"] = paths[:, t]
    with atomic_path(stage_dir / SELECTED) as tmp:
        out.to_parquet(tmp, index=False)
    sizes = [np.bincount(paths[:, t], minlength=len(lv.centroids)) for t, lv in enumerate(levels)]
    return StageResult(
        counts={"input": n, "kept": int(selected.sum()), "dropped": {"not_sampled": int(n - selected.sum())}},
        outputs=[stage_dir / SELECTED, stage_dir / "ledger" / "rebalance.parquet"],
        extra={"levels": [len(lv.centroids) for lv in levels], "target_size": target,
               "largest_cluster_per_level": [int(s.max()) for s in sizes],
               "assignment_gflops": round(counter.flops / 1e9, 3)},
    )


def _ledger(meta: pd.DataFrame, paths: np.ndarray, selected: np.ndarray, target: int, stage_dir: Path) -> None:
    ledger = LedgerWriter("rebalance")
    for i, (row_id, image_id) in enumerate(zip(meta["row_id"].tolist(), meta["image_id"].tolist(), strict=True)):
        ids = {"row_id": int(row_id), "image_id": image_id}
        if paths.shape[1]:
            ledger.info("cluster", **ids, detail={"clusters": paths[i].tolist()})
        if not selected[i]:
            ledger.drop("not_sampled", **ids, detail={"target_size": target})
    ledger.write(stage_dir / "ledger" / "rebalance.parquet")
