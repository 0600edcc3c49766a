"""Dedup: union-find, the multi-view kNN graph, and self + relative dedup on a planted image set (exact ids)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curation.dedup import COMPONENTS, KEPT, dedup
from curation.graph import Edges, UnionFind, components, knn_edges
from curation.index import build_index
from curation.vectors import RowView
from infra.config.curation import DedupConfig, IndexConfig
from infra.config.data import EvalSetConfig
from infra.stage import ShardTracker
from tests.curation.conftest import VARIANTS, blob_image, crop7, jpeg, png, write_folder, write_pool


def test_union_find_matches_scipy_and_labels_by_smallest_member(rng) -> None:
    n = 5000
    src, dst = rng.integers(0, n, 3000), rng.integers(0, n, 3000)
    uf = UnionFind(n)
    for s in range(0, len(src), 700):  # streamed in batches
        uf.union_edges(src[s : s + 700], dst[s : s + 700])
    labels = uf.labels()
    _, ref = connected_components(coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n)), directed=False)
    smallest = pd.Series(np.arange(n)).groupby(ref).transform("min").to_numpy()
    np.testing.assert_array_equal(labels, smallest)
    shuffled = UnionFind(n)
    order = rng.permutation(len(src))
    shuffled.union_edges(dst[order], src[order])
    np.testing.assert_array_equal(shuffled.labels(), labels)


def test_union_find_chain_and_star() -> None:
    uf = UnionFind(8)
    uf.union_edges(np.array([6, 5, 4, 3]), np.array([7, 6, 5, 4]))  # a chain
    uf.union_edges(np.array([2, 2]), np.array([0, 1]))  # a star
    assert uf.labels().tolist() == [0, 0, 0, 3, 3, 3, 3, 3]
    uf.union(7, 1)
    assert uf.labels().tolist() == [0] * 8 and uf.find(5) == 0


def test_knn_edges_take_the_max_over_views_and_keep_k(tmp_path) -> None:
    base = np.eye(4, dtype=np.float32)
    index = build_index(RowView(base), IndexConfig(kind="flat"))
    s = np.sqrt(0.5)
    # node 0: view 0 = e0; view 1 = (e1 + e2)/sqrt2 -> similarity 0.707 with 1 and 2
    views = np.zeros((4, 2, 4), np.float32)
    views[:, 0] = base
    views[0, 1] = [0, s, s, 0]
    views[1:, 1] = base[1:]
    e = knn_edges(index, [(0, views)], k=1, threshold=0.5)
    assert list(zip(e.src.tolist(), e.dst.tolist(), strict=True)) == [(0, 1)]  # k=1: the tie goes to the smaller id
    np.testing.assert_allclose(e.sim, [s], rtol=1e-6)
    e2 = knn_edges(index, [(0, views)], k=3, threshold=0.5)
    assert list(zip(e2.src.tolist(), e2.dst.tolist(), strict=True)) == [(0, 1), (0, 2)]
    assert components(4, e2).tolist() == [0, 0, 0, 3]


def _planted(tmp_path):
    """Pool rows 0-11 distinct; 12-16 copies of pool images; 17-20 copies of evaluation images."""
    originals = [blob_image(i) for i in range(12)]
    ev_test, ev_train = [blob_image(100), blob_image(101)], [blob_image(102)]
    items = [png(im) for im in originals]
    items += [VARIANTS["jpeg"](originals[1]), VARIANTS["crop"](originals[2]), VARIANTS["flip"](originals[3]),
              VARIANTS["resize"](originals[4]), jpeg(originals[2], 50)]  # rows 12-16  # fmt: skip
    items += [VARIANTS["crop"](ev_test[0]), VARIANTS["flip"](ev_test[1]), VARIANTS["exact"](ev_train[0]),
              jpeg(crop7(ev_test[0]), 60)]  # rows 17-20 (20: a copy of the copy 17)  # fmt: skip
    shards = write_pool(tmp_path / "pool", items, shard_size=8)
    ev = EvalSetConfig(name="bench", train=write_folder(tmp_path / "ev" / "train", {"0": ev_train}),
                       test=write_folder(tmp_path / "ev" / "test", {"0": ev_test}))  # fmt: skip
    return shards, [ev]


PIXEL = {"descriptor": {"backend": "pixel", "views": [1.0, 0.86], "flip": True}, "threshold": 0.995, "eval_threshold": 0.995}


def test_planted_set_exact_components_and_drops(tmp_path) -> None:
    shards, ev = _planted(tmp_path)
    out = tmp_path / "dedup"
    res = dedup(shards, ev, out, DedupConfig.model_validate(PIXEL), ShardTracker("dedup", out))
    comp = pd.read_parquet(out / COMPONENTS).set_index("row_id")
    groups = comp.groupby("representative").groups
    multi = sorted(sorted(int(r) for r in rows) for rows in groups.values() if len(rows) > 1)
    assert multi == [[1, 12], [2, 13, 16], [3, 14], [4, 15], [17, 20]]
    assert sorted(pd.read_parquet(out / KEPT)["row_id"].tolist()) == list(range(12))
    ledger = pd.read_parquet(out / "ledger" / "dedup.parquet")
    drops = ledger[ledger["kind"] == "drop"].set_index("row_id")
    assert drops["reason"].to_dict() == {12: "near_duplicate", 13: "near_duplicate", 14: "near_duplicate",
                                         15: "near_duplicate", 16: "near_duplicate", 17: "eval_contamination",
                                         18: "eval_contamination", 19: "eval_contamination", 20: "near_duplicate"}  # fmt: skip
    culprit = {r: json.loads(d)["eval_image"] for r, d in drops["detail"].items() if "eval_image" in d}
    assert culprit == {17: "bench/test/0/000.png", 18: "bench/test/0/001.png", 19: "bench/train/0/000.png",
                       20: "bench/test/0/000.png"}  # fmt: skip
    assert (ledger[ledger["kind"] == "info"]["reason"] == "dup_component").sum() == 21
    assert res.counts["dropped"] == {"near_duplicate": 6, "eval_contamination": 3}
    reps = {r: json.loads(d)["representative_row"] for r, d in drops["detail"].items()}
    assert reps == {12: 1, 13: 2, 14: 3, 15: 4, 16: 2, 17: 17, 18: 18, 19: 19, 20: 17}


def test_representative_largest_keeps_the_upscaled_copy(tmp_path) -> None:
    shards, ev = _planted(tmp_path)
    out = tmp_path / "dedup"
    dedup(shards, ev, out, DedupConfig.model_validate({**PIXEL, "representative": "largest"}), ShardTracker("dedup", out))
    kept = sorted(pd.read_parquet(out / KEPT)["row_id"].tolist())
    assert kept == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 15]  # row 15 (1.5x resize of row 4) replaces row 4


def test_without_crop_views_the_crop_copies_survive(tmp_path) -> None:
    """The reason for the views: the plain descriptor misses 7%-per-side crops."""
    shards, ev = _planted(tmp_path)
    out = tmp_path / "dedup"
    cfg = DedupConfig.model_validate({**PIXEL, "descriptor": {"backend": "pixel", "views": [1.0], "flip": True}})
    dedup(shards, ev, out, cfg, ShardTracker("dedup", out))
    kept = sorted(pd.read_parquet(out / KEPT)["row_id"].tolist())
    assert kept == [*range(12), 13, 17]


def test_relative_dedup_drops_the_whole_component_at_the_eval_threshold() -> None:
    """A pool chain 0-1-2 (0.7) touching an eval node from 2 (0.5): 0.45 drops all three, 0.6 none."""
    from curation.dedup import _relative, _representatives

    meta = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "row_id": [0, 1, 2, 3], "pixels": 1})
    pool_edges = Edges(np.array([0, 1]), np.array([1, 2]), np.array([0.7, 0.7], np.float32))
    cross = Edges(np.array([2]), np.array([0]), np.array([0.5], np.float32))
    ev_meta = pd.DataFrame({"eval_image": ["ev/test/x.png"]})
    for threshold, expected in ((0.45, ["ev/test/x.png"] * 3 + [None]), (0.6, [None] * 4)):
        labels = np.arange(4)  # self-dedup at 0.8: no components
        table = _representatives(meta, labels, "first_row")
        _relative(table, labels, pool_edges.above(threshold), cross.above(threshold), ev_meta)
        assert table["eval_match"].tolist() == expected


@pytest.mark.parametrize("bad", [{"views": []}, {"views": [0.05]}])
def test_descriptor_views_are_validated(bad) -> None:
    from infra.config.curation import DescriptorConfig

    with pytest.raises(ValueError):
        DescriptorConfig.model_validate(bad)


def test_blocked_ivf_threshold_graph_equals_exact_search(tmp_path, rng) -> None:
    """With every list probed, the matmul-blocked IVF gives the flat index's edges; with fewer, a subset."""
    centres = rng.standard_normal((30, 16)).astype(np.float32)
    x = centres[rng.integers(0, 30, 3000)] + 0.6 * rng.standard_normal((3000, 16)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)  # stored as fp16
    base = RowView(x)
    views = np.stack([x, x[:, ::-1]], 1)  # two "views" per node

    def edges(cfg: IndexConfig, k: int = 5) -> dict:
        index = build_index(base, cfg, seed=0, work_dir=tmp_path)
        e = knn_edges(index, [(0, views[:1700]), (1700, views[1700:])], k=k, threshold=0.8)
        return dict(zip(zip(e.src.tolist(), e.dst.tolist(), strict=True), e.sim.tolist(), strict=True))

    exact = edges(IndexConfig(kind="flat"))
    assert len(exact) == 13621
    blocks = edges(IndexConfig(kind="ivf_blocks", nlist=16, nprobe=16))
    assert blocks.keys() == exact.keys()
    np.testing.assert_allclose([blocks[p] for p in exact], list(exact.values()), atol=1e-6)
    every_pair = edges(IndexConfig(kind="flat"), k=3000)  # all pairs above the threshold
    partial = edges(IndexConfig(kind="ivf_blocks", nlist=16, nprobe=2))
    assert partial.keys() <= every_pair.keys() and len(partial) == 13547


def test_pca_whitening_and_centring(rng) -> None:
    from curation.descriptors import Whitener

    x = rng.standard_normal((2000, 6)).astype(np.float32) @ np.diag([5, 3, 1, 1, 0.5, 0.1]).astype(np.float32) + 2
    w = Whitener.fit(x, "pcaw")
    z = (x - w.mean) @ w.proj  # before the final L2
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(6), atol=1e-3)
    assert Whitener.fit(x, "pcaw", dim=2).proj.shape == (6, 2)
    c = Whitener.fit(x, "center")
    np.testing.assert_allclose(c(x), (x - x.mean(0)) / np.linalg.norm(x - x.mean(0), axis=1, keepdims=True), atol=1e-5)


def test_score_norm_offsets_are_sscds() -> None:
    from curation.descriptors import score_norm_offsets

    q = np.array([[1.0, 0.0]], np.float32)
    bg = np.array([[0.9, np.sqrt(0.19)], [0.5, np.sqrt(0.75)], [0.7, np.sqrt(0.51)], [0.1, np.sqrt(0.99)]], np.float32)
    # neighbours ranked 0..2 (inclusive) by similarity: 0.9, 0.7, 0.5 -> mean 0.7, times beta
    np.testing.assert_allclose(score_norm_offsets(q, bg, (0, 2), 1.0), [0.7], rtol=1e-6)
    np.testing.assert_allclose(score_norm_offsets(q, bg, (1, 2), 0.5), [0.3], rtol=1e-6)


def test_whitening_and_score_norm_run_in_the_stage(tmp_path) -> None:
    shards, ev = _planted(tmp_path)
    out = tmp_path / "dedup"
    cfg = DedupConfig.model_validate({**PIXEL, "descriptor": {**PIXEL["descriptor"], "whitening": "center"},
                                      "score_norm": {"enabled": True, "background_size": 8}, "threshold": 0.3,
                                      "eval_threshold": 0.3})  # fmt: skip
    res = dedup(shards, ev, out, cfg, ShardTracker("dedup", out))
    assert res.extra["whitening"] == "center" and res.extra["score_norm"] is True
    assert res.counts["input"] == 21 and (out / "index_vectors.npy").is_file()
