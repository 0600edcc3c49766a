"""Concept rebalancing with hierarchical k-means and balanced sampling (Vo et al. 2024, re-implemented from the
paper's description; the reference code is CC-BY-NC and was not used).

Hierarchy (bottom-up): level 1 clusters the points; level t clusters the centroids of level t-1.
Balanced sampling (top-down): at the top level, find the cap x with sum_i min(x, size_i) = target (sizes count
the leaf points under each cluster), hand the remainder out +1 to random clusters above the cap, then split each
cluster's quota the same way among its children, down to the points.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from infra.config.curation import RebalanceConfig
from infra.lineage import LedgerWriter
from infra.stage import StageResult
from infra.storage import atomic_path

SELECTED = "selected.parquet"


@dataclass
class Level:
    centroids: np.ndarray  # (k, D)
    assign: np.ndarray  # (n_inputs,) cluster of each input of this level


def kmeans(x: np.ndarray, k: int, n_iter: int, seed: int) -> Level:
    k = max(1, min(k, len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=n_iter, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    _, assign = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return Level(km.centroids.copy(), assign.ravel().astype(np.int64))


def hierarchical_kmeans(x: np.ndarray, n_clusters: list[int], n_iter: int, seed: int) -> list[Level]:
    levels, data = [], x
    for t, k in enumerate(n_clusters):
        level = kmeans(data, k, n_iter, seed + t)
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


def leaf_members(levels: list[Level]) -> list[list[np.ndarray]]:
    """members[t][c]: indices of the inputs of level t in cluster c."""
    return [[np.flatnonzero(lv.assign == c) for c in range(len(lv.centroids))] for lv in levels]


def balanced_sample(levels: list[Level], target: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    members = leaf_members(levels)
    # Leaf point count under every cluster of every level.
    flat = [np.bincount(levels[0].assign, minlength=len(levels[0].centroids))]
    for t in range(1, len(levels)):
        flat.append(np.array([flat[t - 1][m].sum() for m in members[t]]))

    def take(t: int, clusters: np.ndarray, quota: int) -> list[np.ndarray]:
        q = split_quota(flat[t][clusters], quota, rng)
        out = []
        for c, n in zip(clusters, q, strict=True):
            if n == 0:
                continue
            if t == 0:
                out.append(rng.choice(members[0][c], n, replace=False))
            else:
                out.extend(take(t - 1, members[t][c], int(n)))
        return out

    top = len(levels) - 1
    picked = take(top, np.arange(len(levels[top].centroids)), target)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def rebalance(meta: pd.DataFrame, emb: np.ndarray, stage_dir: Path, cfg: RebalanceConfig, seed: int) -> StageResult:
    n = len(meta)
    target = n if cfg.target_size is None else min(cfg.target_size, n)
    if n == 0 or not cfg.enabled:
        chosen, levels = np.arange(n), []
    else:
        levels = hierarchical_kmeans(emb, cfg.n_clusters, cfg.n_iter, seed)
        chosen = balanced_sample(levels, target, seed) if target < n else np.arange(n)
    cluster_path = _cluster_path(levels, n)
    ledger = LedgerWriter("rebalance")
    selected = np.zeros(n, bool)
    selected[chosen] = True
    for i, r in enumerate(meta.itertuples(index=False)):
        ids = {"row_id": int(r.row_id), "image_id": r.image_id}
        if levels:
            ledger.info("cluster", **ids, detail={"clusters": cluster_path[i].tolist()})
        if not selected[i]:
            ledger.drop("not_sampled", **ids, detail={"target_size": target})
    ledger.write(stage_dir / "ledger" / "rebalance.parquet")
    out = meta.assign(selected=selected)
    for t in range(cluster_path.shape[1]):
        out[f"cluster_l{t + 1}"] = cluster_path[:, t]
    with atomic_path(stage_dir / SELECTED) as tmp:
        out.to_parquet(tmp, index=False)
    return StageResult(
        counts={"input": n, "kept": int(selected.sum()), "dropped": {"not_sampled": int(n - selected.sum())}},
        outputs=[stage_dir / SELECTED, stage_dir / "ledger" / "rebalance.parquet"],
        extra={"levels": [len(lv.centroids) for lv in levels], "target_size": target},
    )


def _cluster_path(levels: list[Level], n: int) -> np.ndarray:
    """(n, n_levels): each point's cluster at every level."""
    if not levels:
        return np.zeros((n, 0), np.int64)
    path = [levels[0].assign]
    for lv in levels[1:]:
        path.append(lv.assign[path[-1]])
    return np.stack(path, 1)
