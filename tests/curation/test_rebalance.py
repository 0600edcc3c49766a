"""Rebalancing: k-means core, hierarchical k-means with resampling, balanced sampling, the 2-D density test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from curation.kmeans import assign, kmeans, kmeans_plusplus
from curation.rebalance import (
    CHECKPOINTS,
    SELECTED,
    StepCheckpoints,
    balanced_sample,
    cluster_paths,
    hierarchical_kmeans,
    rebalance,
    split_quota,
)
from curation.vectors import RowView, VectorStore
from infra import lineage
from infra.config.curation import RebalanceConfig


def rings(seed: int = 0, sizes: tuple[int, ...] = (6000, 600, 60)) -> tuple[np.ndarray, np.ndarray]:
    """Three equal circles (radius 1, side by side) holding very different numbers of points."""
    rng = np.random.default_rng(seed)
    pts, group = [], []
    for g, (n, cx) in enumerate(zip(sizes, (-3.0, 0.0, 3.0), strict=True)):
        theta = rng.uniform(0, 2 * np.pi, n)
        r = 1.0 + 0.05 * rng.standard_normal(n)
        pts.append(np.stack([cx + r * np.cos(theta), r * np.sin(theta)], 1))
        group.append(np.full(n, g))
    return np.concatenate(pts).astype(np.float32), np.concatenate(group)


def kl_to_uniform(groups: np.ndarray, n_groups: int = 3) -> float:
    p = np.bincount(groups, minlength=n_groups) / len(groups)
    p = p[p > 0]
    return float((p * np.log(p * n_groups)).sum())


def test_density_flattening_on_rings() -> None:
    """Selecting 150 of 6,660 points: the selection's distribution over the three rings (the concepts) moves toward
    uniform from random sampling, to flat k-means + balanced sampling, to hierarchical k-means with resampling."""
    x, group = rings()
    target = 150
    random = np.random.default_rng(0).choice(len(x), target, replace=False)
    flat_cfg = RebalanceConfig(n_clusters=[100], n_iter=20)
    flat = balanced_sample(hierarchical_kmeans(RowView(x), flat_cfg, seed=0), target, seed=0)
    hier_cfg = RebalanceConfig(n_clusters=[100, 10], n_resampling_steps=[5, 5], sample_sizes=[10, 3], n_iter=20)
    hier = balanced_sample(hierarchical_kmeans(RowView(x), hier_cfg, seed=0), target, seed=0)
    assert len(flat) == len(hier) == target
    kl = [round(kl_to_uniform(group[s]), 4) for s in (random, flat, hier)]
    assert kl == [0.7399, 0.2578, 0.0097]
    assert np.bincount(group[hier], minlength=3).tolist() == [60, 45, 45]


def test_split_quota_caps_and_hands_out_the_remainder() -> None:
    rng = np.random.default_rng(0)
    sizes = np.array([100, 3, 10, 50, 7])
    q = split_quota(sizes, 40, rng)
    assert q.sum() == 40 and q[1] == 3 and q[4] == 7  # small clusters are taken whole
    assert sorted(q[[0, 2, 3]].tolist()) == [10, 10, 10]  # cap 10; the remainder went to clusters above it
    assert split_quota(sizes, 1000, rng).tolist() == sizes.tolist()
    q = split_quota(np.array([5, 5, 5]), 7, np.random.default_rng(1))
    assert sorted(q.tolist()) == [2, 2, 3]


def test_balanced_sample_is_exact_deterministic_and_nested() -> None:
    x, _ = rings(1, (800, 200, 40))
    cfg = RebalanceConfig(n_clusters=[40, 6, 2], n_resampling_steps=[2, 2, 1], sample_sizes=[5, 2, 1], n_iter=10)
    levels = hierarchical_kmeans(RowView(x), cfg, seed=3)
    assert [len(lv.centroids) for lv in levels] == [40, 6, 2]
    for target in (1, 77, 500, 1040):
        sel = balanced_sample(levels, target, seed=5)
        assert len(sel) == target and len(np.unique(sel)) == target
    a, b = balanced_sample(levels, 300, seed=5), balanced_sample(levels, 300, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, balanced_sample(levels, 300, seed=6))
    again = hierarchical_kmeans(RowView(x), cfg, seed=3)
    for u, v in zip(levels, again, strict=True):
        np.testing.assert_array_equal(u.assign, v.assign)
        np.testing.assert_array_equal(u.centroids, v.centroids)
    paths = cluster_paths(levels, len(x))
    assert paths.shape == (1040, 3) and (paths[:, 1] == levels[1].assign[paths[:, 0]]).all()


def test_closest_leaf_strategy_takes_points_nearest_the_centroid() -> None:
    x, _ = rings(2, (300, 100, 50))
    levels = hierarchical_kmeans(RowView(x), RebalanceConfig(n_clusters=[10], n_iter=10), seed=0)
    sel = balanced_sample(levels, 50, seed=0, leaf_strategy="closest")
    lv = levels[0]
    for c in range(10):
        chosen = sel[lv.assign[sel] == c]
        others = np.setdiff1d(np.flatnonzero(lv.assign == c), chosen)
        if len(chosen) and len(others):
            assert lv.dist2[chosen].max() <= lv.dist2[others].min()


def test_fit_on_a_sample_then_assign_all_from_memory_mapped_shards(tmp_path) -> None:
    x, _ = rings(3, (3000, 300, 30))
    half = len(x) // 2
    store = VectorStore([VectorStore.from_array(x[:half], tmp_path / "a.npy").paths[0],
                         VectorStore.from_array(x[half:], tmp_path / "b.npy").paths[0]])  # fmt: skip
    cfg = RebalanceConfig(n_clusters=[20, 4], fit_sample=1000, n_iter=10)
    levels = hierarchical_kmeans(RowView(store), cfg, seed=0)
    assert len(levels[0].assign) == len(x)
    xs = store.read_all()
    d2 = ((xs[:, None, :] - levels[0].centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(levels[0].assign, d2.argmin(1))  # every point at its nearest centroid
    in_memory = hierarchical_kmeans(RowView(xs), cfg, seed=0)
    np.testing.assert_array_equal(in_memory[0].assign, levels[0].assign)


def test_kmeans_core_matches_a_naive_lloyd() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    init = kmeans_plusplus(x, 7, np.random.default_rng(1))
    km = kmeans(x, 7, n_iter=200, rng=np.random.default_rng(1), init=init)
    c, a = init.astype(np.float64), None
    while True:  # naive Lloyd to convergence
        new = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        if a is not None and (new == a).all():
            break
        a = new
        c = np.stack([x[a == j].astype(np.float64).mean(0) if (a == j).any() else c[j] for j in range(7)])
    np.testing.assert_array_equal(km.assign, ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1))
    np.testing.assert_allclose(km.centroids, c, rtol=1e-5, atol=1e-6)
    assert kmeans(x[:3], 10, 5, np.random.default_rng(0)).centroids.shape == (3, 8)  # k capped at n


def test_bf16_assignment_and_seeding_agree_with_fp32_on_separated_clusters() -> None:
    """The bf16 assignment (norm term folded into the matmul) picks the fp32 argmin wherever the gap between the
    two nearest centroids is above bf16 rounding, and returns the fp32 path's distance to the centroid it picks."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 64)).astype(np.float32) * 4
    x = (centres[rng.integers(0, 40, 3000)] + 0.3 * rng.standard_normal((3000, 64))).astype(np.float32)
    a32, d32 = assign([(0, x)], centres, len(x), "fp32")
    a16, d16 = assign([(0, x)], centres, len(x), "bf16")
    np.testing.assert_array_equal(a16, a32)
    exact = ((x.astype(np.float64) - centres[a16]) ** 2).sum(1)  # fp32's ||x||^2 - 2 x.c + ||c||^2 cancels: the
    np.testing.assert_allclose(d16, d32, atol=1e-6 * (x * x).sum(1).max())  # same error as the fp32 path's, not bf16's
    assert np.abs(d16 - exact).max() < 1e-5 * (x * x).sum(1).max()
    seeds = kmeans_plusplus(x, 40, np.random.default_rng(1), "bf16")  # one seed in every separated cluster
    assert len(np.unique(((seeds[:, None] - centres[None]) ** 2).sum(-1).argmin(1))) == 40


def test_stage_records_selection_and_lineage(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(lineage, "PART_EVENTS", 300)  # the ledger's 940 events in parts of 300
    x, _ = rings(4, (400, 100, 20))
    meta = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(x))], "row_id": range(len(x))})
    res = rebalance(meta, RowView(x), tmp_path, RebalanceConfig(n_clusters=[12, 3], target_size=100, n_iter=10), seed=0)
    out = pd.read_parquet(tmp_path / SELECTED)
    assert out["selected"].sum() == 100 and res.counts["dropped"] == {"not_sampled": 420}
    assert list(out.columns[-2:]) == ["cluster_l1", "cluster_l2"]
    parts = [tmp_path / "ledger" / f"rebalance-{i:05d}.parquet" for i in range(4)]
    assert sorted((tmp_path / "ledger").iterdir()) == parts and res.outputs == [tmp_path / SELECTED, *parts]
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [300, 300, 300, 40]
    ledger = pd.read_parquet(tmp_path / "ledger")
    assert (ledger["reason"] == "cluster").sum() == 520 and (ledger["reason"] == "not_sampled").sum() == 420
    assert not (tmp_path / CHECKPOINTS).exists() and res.extra["kmeans_steps_restored"] == 0  # removed once written


def test_an_interrupted_hierarchy_continues_after_its_last_saved_step(tmp_path, monkeypatch) -> None:
    """Every k-means step is saved with the RNG state after it: a run preempted inside level 2 resumes without
    redoing a finished step and ends with exactly the uninterrupted run's levels and selection."""
    import curation.rebalance as rb

    x, _ = rings(5, (3000, 300, 30))
    cfg = RebalanceConfig(n_clusters=[30, 6], n_resampling_steps=[3, 2], sample_sizes=[5, 2], fit_sample=1500,
                          n_iter=10)
    whole = hierarchical_kmeans(RowView(x), cfg, seed=0)
    real, calls = rb.kmeans, []

    def preempted_at_the_fifth(*args, **kwargs):  # level 1: k-means calls 1-3; level 2: 4 (its step 0) and 5
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("preempted")
        return real(*args, **kwargs)

    monkeypatch.setattr(rb, "kmeans", preempted_at_the_fifth)
    with pytest.raises(RuntimeError, match="preempted"):
        hierarchical_kmeans(RowView(x), cfg, seed=0, checkpoints=StepCheckpoints(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["level0_0.npz", "level0_1.npz", "level0_2.npz",
                                                          "level0_all.npz", "level1_0.npz"]
    calls.clear()
    again = StepCheckpoints(tmp_path)
    resumed = hierarchical_kmeans(RowView(x), cfg, seed=0, checkpoints=again)
    assert len(calls) == 1 and again.restored == [(0, "all"), (1, "0")]  # only level 2's last step ran
    for a, b in zip(whole, resumed, strict=True):
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.assign, b.assign)
        np.testing.assert_array_equal(a.dist2, b.dist2)
    np.testing.assert_array_equal(balanced_sample(whole, 200, seed=0), balanced_sample(resumed, 200, seed=0))
    assert len(np.unique(resumed[1].assign)) > 1


@pytest.mark.parametrize("field", ["n_resampling_steps", "sample_sizes"])
def test_per_level_lists_are_validated(field) -> None:
    with pytest.raises(ValueError):
        RebalanceConfig(n_clusters=[10, 2], **{field: [1]})


def test_random_resampling_strategy() -> None:
    """`random`: per cluster a random subset of `sample_size` members (clusters no larger are taken whole), drawn from
    the level's generator; on the rings it spreads level-1 centroids more evenly over the rings than `closest`."""
    from curation.rebalance import resample

    members = [np.array([3, 0, 7, 1, 9, 4]), np.array([12, 10]), np.array([15, 13, 19, 14, 18])]
    assert resample(members, 3, "random", np.random.default_rng(0)).tolist() == [1, 4, 9, 12, 10, 14, 15, 18]
    r = np.random.default_rng(0)
    ref = [np.sort(r.choice(members[0], 3, replace=False)), members[1], np.sort(r.choice(members[2], 3, replace=False))]
    assert np.concatenate(ref).tolist() == [1, 4, 9, 12, 10, 14, 15, 18]
    assert resample(members, 3, "closest", np.random.default_rng(0)).tolist() == [3, 0, 7, 12, 10, 15, 13, 19]
    x, group = rings()
    per_ring, runs = {}, {}
    for strategy in ("closest", "random"):
        cfg = RebalanceConfig(n_clusters=[100, 10], n_resampling_steps=[5, 5], sample_sizes=[10, 3], n_iter=20,
                              resample_strategy=strategy)  # fmt: skip
        runs[strategy] = hierarchical_kmeans(RowView(x), cfg, seed=0)
        per_ring[strategy] = np.bincount(np.digitize(runs[strategy][0].centroids[:, 0], [-1.5, 1.5]), minlength=3).tolist()
        sel = balanced_sample(runs[strategy], 150, seed=0)
        assert np.bincount(group[sel], minlength=3).tolist() == [60, 45, 45] and round(kl_to_uniform(group[sel]), 4) == 0.0097
    assert per_ring == {"closest": [54, 28, 18], "random": [42, 41, 17]}  # rings of 6,000 / 600 / 60 points
    again = hierarchical_kmeans(RowView(x), cfg, seed=0)  # cfg: the random strategy (last in the loop)
    for u, v in zip(runs["random"], again, strict=True):
        np.testing.assert_array_equal(u.centroids, v.centroids)
    assert not np.array_equal(runs["random"][0].assign, runs["closest"][0].assign)
