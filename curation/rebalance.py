"""Concept rebalancing with hierarchical k-means and balanced sampling (Vo et al. 2024, arXiv 2405.15613),
re-implemented from the paper's description; the reference code is CC-BY-NC and was not read or used.

Hierarchy, bottom-up: level 1 clusters the points, level t > 1 clusters the centroids of level t-1. Each level
is k-means (k-means++ init, Lloyd), then ``steps - 1`` resampling steps: take the ``sample_size`` points closest to
each centroid (or a random subset of that size), rerun k-means on that union, and reassign every input of the
level to the new centroids. Resampling pulls centroids away from dense regions toward a uniform cover of the
support. Level 1 is fitted on a sample when the pool is larger than ``fit_sample`` and then assigned in chunks.

Every finished k-means step (and level 1's assignment of the whole pool) is saved in the stage folder with the RNG
state after it (:class:`StepCheckpoints`): a stage interrupted after hours of k-means continues from its last
finished step and selects exactly what an uninterrupted run selects. The folder is removed once the selection is
written.

Balanced sampling, top-down: at each node the quota is split among its children with the largest cap x such
that sum_i min(x, size_i) <= quota (sizes count the leaf points under each child); the remainder goes +1 to
random children larger than x. At level 1 the points are drawn at random (``random``) or closest to the
centroid first (``closest``).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from curation.kmeans import FlopCounter, array_chunks, assign, kmeans
from curation.vectors import RowView
from infra.config.curation import RebalanceConfig
from infra.lineage import LedgerParts, ledger_dir
from infra.memory import release_free_heap
from infra.stage import StageResult
from infra.storage import atomic_open, atomic_path

SELECTED = "selected.parquet"
CHECKPOINTS = "kmeans_steps"
log = logging.getLogger(__name__)


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


class StepCheckpoints:
    """Finished k-means steps of the hierarchy: one ``level{t}_{step}.npz`` per step (centroids, assignment, squared
    distances, and the RNG state after the step, so that what follows draws the same numbers). ``folder=None``:
    nothing is saved or restored."""

    def __init__(self, folder: Path | None):
        self.folder = None if folder is None else Path(folder)
        self.restored: list[tuple[int, str]] = []  # (level, step) read back, in order

    def _path(self, level: int, step: str) -> Path:
        assert self.folder is not None
        return self.folder / f"level{level}_{step}.npz"

    def restore(self, level: int, step: str, rng: np.random.Generator) -> Level | None:
        if self.folder is None or not self._path(level, step).is_file():
            return None
        with np.load(self._path(level, step)) as z:
            rng.bit_generator.state = json.loads(str(z["rng"]))
            lv = Level(z["centroids"], z["assign"], z["dist2"])
        self.restored.append((level, step))
        return lv

    def save(self, level: int, step: str, lv: Level, rng: np.random.Generator) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_open(self._path(level, step)) as f:
            np.savez(f, centroids=lv.centroids, assign=lv.assign, dist2=lv.dist2,
                     rng=np.array(json.dumps(rng.bit_generator.state)))

    def last(self, level: int, steps: int) -> int:
        """The last finished resampling step of ``level`` (-1: none)."""
        done = [s for s in range(steps) if self.folder is not None and self._path(level, str(s)).is_file()]
        return max(done, default=-1)


def fit_level(x: np.ndarray, k: int, steps: int, sample_size: int, cfg: RebalanceConfig, rng: np.random.Generator,
              counter: FlopCounter | None = None, checkpoints: StepCheckpoints | None = None,
              level: int = 0) -> Level:  # fmt: skip
    """k-means with resampling on the in-memory inputs of one level, continuing after its last saved step."""
    checkpoints = checkpoints or StepCheckpoints(None)
    start = checkpoints.last(level, steps)
    lv = checkpoints.restore(level, str(start), rng) if start >= 0 else None
    if lv is not None:
        log.info("rebalance: level %d continues after its saved k-means step %d", level + 1, start)
    for step in range(start + 1, steps):
        if lv is None:
            km = kmeans(x, k, cfg.n_iter, rng, cfg.precision, counter, init_sample=cfg.init_sample)
        else:
            members = members_by_distance(lv.assign, lv.dist2, len(lv.centroids))
            sub = resample(members, sample_size, cfg.resample_strategy, rng)
            km = kmeans(x[sub], k, cfg.n_iter, rng, cfg.precision, counter, init_sample=cfg.init_sample)
            km.assign, km.dist2 = assign(array_chunks(x), km.centroids, len(x), cfg.precision, counter)
        lv = Level(km.centroids, km.assign, km.dist2)
        checkpoints.save(level, str(step), lv, rng)
    assert lv is not None
    return lv


def hierarchical_kmeans(points: RowView, cfg: RebalanceConfig, seed: int, counter: FlopCounter | None = None,
                        checkpoints: StepCheckpoints | None = None) -> list[Level]:  # fmt: skip
    """Bottom-up hierarchy over a (possibly memory-mapped) point set; level 1 fitted on a sample."""
    checkpoints = checkpoints or StepCheckpoints(None)
    release_free_heap()  # what earlier steps freed, before this step's peak
    rng = np.random.default_rng(seed)
    n = len(points)
    fit_rows = np.arange(n) if n <= cfg.fit_sample else np.sort(rng.choice(n, cfg.fit_sample, replace=False))
    data = None
    levels = []
    for t, k in enumerate(cfg.n_clusters):
        whole = t == 0 and len(fit_rows) < n  # level 1 fitted on a sample, then every point assigned
        level = checkpoints.restore(t, "all", rng) if whole else None
        if level is None:
            if data is None:
                data = points.take(fit_rows)
            level = fit_level(data, k, cfg.steps(t), cfg.sample_size(t), cfg, rng, counter, checkpoints, t)
            if whole:  # assign every point, chunk by chunk
                a, d = assign(points.chunks(), level.centroids, n, cfg.precision, counter)
                level = Level(level.centroids, a, d)
                checkpoints.save(t, "all", level, rng)
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
    checkpoints = StepCheckpoints(stage_dir / CHECKPOINTS)
    levels = hierarchical_kmeans(points, cfg, seed, counter, checkpoints) if n and cfg.enabled else []
    chosen = balanced_sample(levels, target, seed, cfg.leaf_strategy) if levels and target < n else np.arange(n)
    paths = cluster_paths(levels, n)
    selected = np.zeros(n, bool)
    selected[chosen] = True
    parts = _ledger(meta, paths, selected, target, stage_dir)
    out = meta.assign(selected=selected)
    for t in range(paths.shape[1]):
        out[f"cluster_l{t + 1}"] = paths[:, t]
    with atomic_path(stage_dir / SELECTED) as tmp:
        out.to_parquet(tmp, index=False)
    shutil.rmtree(stage_dir / CHECKPOINTS, ignore_errors=True)  # the selection holds every level's clusters
    sizes = [np.bincount(paths[:, t], minlength=len(lv.centroids)) for t, lv in enumerate(levels)]
    return StageResult(
        counts={"input": n, "kept": int(selected.sum()), "dropped": {"not_sampled": int(n - selected.sum())}},
        outputs=[stage_dir / SELECTED, *parts],
        extra={"levels": [len(lv.centroids) for lv in levels], "target_size": target,
               "largest_cluster_per_level": [int(s.max()) for s in sizes],
               "assignment_gflops": round(counter.flops / 1e9, 3),
               "kmeans_steps_restored": len(checkpoints.restored)},
    )


def _ledger(meta: pd.DataFrame, paths: np.ndarray, selected: np.ndarray, target: int, stage_dir: Path) -> list[Path]:
    ledger = LedgerParts("rebalance", ledger_dir(stage_dir))
    for i, (row_id, image_id) in enumerate(zip(meta["row_id"].tolist(), meta["image_id"].tolist(), strict=True)):
        ids = {"row_id": int(row_id), "image_id": image_id}
        if paths.shape[1]:
            ledger.info("cluster", **ids, detail={"clusters": paths[i].tolist()})
        if not selected[i]:
            ledger.drop("not_sampled", **ids, detail={"target_size": target})
    return ledger.close()
