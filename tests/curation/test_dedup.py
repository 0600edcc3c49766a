"""Dedup: union-find, the multi-view kNN graph, and self + relative dedup on a planted image set (exact ids)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curation.dedup import COMPONENTS, KEPT, dedup
from curation.graph import Edges, UnionFind, components, knn_edges
from curation.index import build_index
from curation.vectors import RowView
from infra import lineage
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
    e = knn_edges(index, views, k=1, threshold=0.5)
    assert list(zip(e.src.tolist(), e.dst.tolist(), strict=True)) == [(0, 1)]  # k=1: the tie goes to the smaller id
    np.testing.assert_allclose(e.sim, [s], rtol=1e-6)
    e2 = knn_edges(index, views, k=3, threshold=0.5)
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


def test_planted_set_exact_components_and_drops(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(lineage, "PART_EVENTS", 8)  # the ledger's 30 events in parts of 8
    shards, ev = _planted(tmp_path)
    out = tmp_path / "dedup"
    res = dedup(shards, ev, out, DedupConfig.model_validate(PIXEL), ShardTracker("dedup", out))
    comp = pd.read_parquet(out / COMPONENTS).set_index("row_id")
    groups = comp.groupby("representative").groups
    multi = sorted(sorted(int(r) for r in rows) for rows in groups.values() if len(rows) > 1)
    assert multi == [[1, 12], [2, 13, 16], [3, 14], [4, 15], [17, 20]]
    assert sorted(pd.read_parquet(out / KEPT)["row_id"].tolist()) == list(range(12))
    parts = [out / "ledger" / f"dedup-{i:05d}.parquet" for i in range(4)]
    assert sorted((out / "ledger").iterdir()) == parts and set(parts) <= set(res.outputs)  # the manifest lists them
    ledger = pd.read_parquet(out / "ledger")
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [8, 8, 8, 6]
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
        e = knn_edges(index, views, k=k, threshold=0.8, chunk=1700)
        return dict(zip(zip(e.src.tolist(), e.dst.tolist(), strict=True), e.sim.tolist(), strict=True))

    exact = edges(IndexConfig(kind="flat"))
    assert len(exact) == 13621
    blocks = edges(IndexConfig(kind="ivf_blocks", nlist=16, nprobe=16))
    assert blocks.keys() == exact.keys()
    np.testing.assert_allclose([blocks[p] for p in exact], list(exact.values()), atol=1e-6)
    every_pair = edges(IndexConfig(kind="flat"), k=3000)  # all pairs above the threshold
    partial = edges(IndexConfig(kind="ivf_blocks", nlist=16, nprobe=2))
    assert partial.keys() <= every_pair.keys() and len(partial) == 13570
    # a second pass over every list for the nodes with an edge after the first: all edges but those of 2 nodes
    # whose single edge (an isolated pair) neither end found in the first pass
    wide = edges(IndexConfig(kind="ivf_blocks", nlist=16, nprobe=2, nprobe_wide=16))
    assert wide.keys() <= exact.keys() and sorted(exact.keys() - wide.keys()) == [(314, 173), (1699, 2805)]


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


def test_score_norm_offsets_stream_equal_the_dense_formula(rng) -> None:
    """Chunked background with a running partial top-k = the dense (queries x background) sort, whatever the block."""
    from curation.descriptors import l2n, score_norm_offsets

    q, bg = l2n(rng.standard_normal((300, 16))), l2n(rng.standard_normal((5000, 16)))

    def dense(bg: np.ndarray, ranks: tuple[int, int], beta: float) -> np.ndarray:  # the formula before streaming
        top = -np.sort(-(q @ bg.T), axis=1)[:, : ranks[1] + 1]
        return (beta * top[:, ranks[0] :].mean(1)).astype(np.float32)

    for ranks, beta in (((0, 2), 1.0), ((1, 4), 0.5), ((0, 0), 2.0)):
        for block in (4096, 100_000, 1 << 22):  # 4096: 64 queries x 64 background rows per block
            got = score_norm_offsets(q, bg, ranks, beta, block=block)
            np.testing.assert_allclose(got, dense(bg, ranks, beta), rtol=0, atol=2e-6)  # chunked matmul rounding
    np.testing.assert_array_equal(score_norm_offsets(q, bg[:2], (0, 2), 1.0), dense(bg[:2], (0, 2), 1.0))  # < k


def test_disabled_dedup_passes_every_image_with_an_info_event(tmp_path) -> None:
    shards, ev = _planted(tmp_path)
    out = tmp_path / "dedup"
    res = dedup(shards, ev, out, DedupConfig.model_validate({**PIXEL, "enabled": False}), ShardTracker("dedup", out))
    assert res.counts == {"input": 21, "kept": 21, "dropped": {"near_duplicate": 0, "eval_contamination": 0},
                          "components": 21, "components_multi": 0, "edges": 0, "eval_edges": 0}  # fmt: skip
    assert res.extra["enabled"] is False and not (out / "descriptors").exists()  # nothing was decoded or described
    kept = pd.read_parquet(out / KEPT)
    assert kept["row_id"].tolist() == list(range(21)) and (kept["component_size"] == 1).all()
    comp = pd.read_parquet(out / COMPONENTS)
    assert (comp["representative"] == comp["image_id"]).all() and comp["eval_match"].isna().all()
    ledger = pd.read_parquet(out / "ledger")
    assert ledger[["kind", "reason"]].drop_duplicates().values.tolist() == [["info", "dedup_disabled"]]
    assert sorted(ledger["row_id"].tolist()) == list(range(21)) and len(pd.read_parquet(out / "edges.parquet")) == 0


def test_approximate_index_recall_is_in_the_stage_result(tmp_path) -> None:
    """A pool above `flat_max` takes the ivf_blocks path; the graph's edge recall against brute force is recorded."""
    from infra.manifest import StageManifest, read_manifest, write_manifest

    shards, ev = _planted(tmp_path)
    out = tmp_path / "dedup"
    index = {"flat_max": 4, "large": "ivf_blocks", "nlist": 4, "nprobe": 1, "recall_sample": 10}
    res = dedup(shards, ev, out, DedupConfig.model_validate({**PIXEL, "index": index}), ShardTracker("dedup", out))
    assert res.extra["index"]["kind"] == "ivf_blocks" and res.extra["index"]["nlist"] == 4
    assert res.extra["recall"] == {"sample": 10, "k": 64, "kept_threshold": 0.995, "queries": 10, "exact_edges": 4,
                                   "found": 4, "recall": 1.0,
                                   "at_threshold": {"queries": 10, "exact_edges": 4, "found": 4, "recall": 1.0}}  # fmt: skip
    comp = pd.read_parquet(out / COMPONENTS)
    assert sorted(comp.groupby("representative")["row_id"].apply(sorted).map(len)) == [1] * 10 + [2, 2, 2, 2, 3]
    write_manifest(out, StageManifest(stage="dedup", run_id="r", config_hash="c", code_version="v", inputs_digest="i",
                                      started_at="s", finished_at="f", counts=res.counts, extra=res.extra))  # fmt: skip
    assert read_manifest(out).extra["recall"] == res.extra["recall"]
    flat = dedup(shards, ev, tmp_path / "flat", DedupConfig.model_validate(PIXEL), ShardTracker("dedup", tmp_path / "flat"))
    assert flat.extra["recall"] is None  # exact search: nothing to measure


def _described(x: np.ndarray, views: np.ndarray, root) -> tuple:
    from curation.dedup import Described
    from curation.vectors import VectorStore

    meta = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(x))], "row_id": range(len(x)), "shard": "0", "pixels": 1})
    pool = Described(meta, VectorStore.from_array(views, root / "views.npy"), RowView(VectorStore.from_array(x, root / "x.npy")))
    ev_views = VectorStore.from_array(np.zeros((0, views.shape[1], x.shape[1]), np.float32), root / "ev.npy")
    ev = Described(pd.DataFrame(columns=["eval_image", "eval_image_id"]), ev_views, RowView(np.zeros((0, x.shape[1]), np.float32)))
    return pool, ev


def _clustered(rng, n: int = 3000, dim: int = 16) -> np.ndarray:
    centres = rng.standard_normal((30, dim)).astype(np.float32)
    x = centres[rng.integers(0, 30, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)


def test_graph_recall_equals_the_share_of_flat_graph_edges_found(tmp_path, rng) -> None:
    """The recorded recall on a node sample = |approximate edges ∩ flat-index edges| / |flat-index edges| there."""
    from curation.dedup import dedup_graph
    from curation.graph import edge_recall, exact_edges

    x = _clustered(rng)
    views = np.stack([x, x[:, ::-1]], 1)
    pool, ev = _described(x, views, tmp_path)
    cfg = DedupConfig(k=5, threshold=0.85, eval_threshold=0.8)
    flat = knn_edges(build_index(pool.base, IndexConfig(kind="flat")), views, k=5, threshold=0.8)
    every = np.arange(3000)
    exact = exact_edges(pool.base, every, views, 5, 0.8, batch=700)  # brute force = the flat index's graph
    assert np.array_equal(exact.src, flat.src) and np.array_equal(exact.dst, flat.dst) and len(exact) == 13621
    np.testing.assert_allclose(exact.sim, flat.sim, atol=1e-6)
    for sample, nprobe, expected in ((3000, 2, (13621, 13518, 0.9924)), (500, 1, (2287, 2142, 0.9366))):
        index_cfg = IndexConfig(kind="ivf_blocks", nlist=16, nprobe=nprobe, recall_sample=sample)
        g = dedup_graph(pool, ev, cfg, index_cfg, seed=0, work_dir=tmp_path)
        nodes = np.sort(np.random.default_rng(2).choice(3000, sample, replace=False))  # seed + 2, as recorded
        ref = edge_recall(g.edges, flat.src_in(nodes), nodes)
        assert (g.recall["exact_edges"], g.recall["found"], g.recall["recall"]) == expected
        assert {k: g.recall[k] for k in ref} == ref and g.recall["sample"] == sample
        above = flat.above(0.85).src_in(nodes)
        assert g.recall["at_threshold"] == edge_recall(g.edges.above(0.85), above, nodes)


def test_centroid_ivf_returns_the_best_centroids_of_the_probed_groups(rng) -> None:
    from curation.ivf_blocks import CentroidIVF

    x = _clustered(rng, 4000, 16)
    q = CentroidIVF.train(x, 100, nprobe=3, seed=0)
    assert len(q.top) == 10 and q.bounds.tolist() == [0, 12, 23, 32, 42, 55, 65, 76, 83, 90, 100]  # sqrt(100) groups
    queries = _clustered(np.random.default_rng(1), 300, 16)
    sims, ids = q.search(queries, 7, block=500)  # block: a few queries per chunk
    for i in range(len(queries)):  # naive: score the 3 best groups' centroids, take the 7 best
        groups = np.argsort(-(q.top @ queries[i]), kind="stable")[:3]
        cand = np.concatenate([np.arange(q.bounds[g], q.bounds[g + 1]) for g in groups])
        s = q.centroids[cand] @ queries[i]
        assert set(ids[i].tolist()) == set(cand[np.argsort(-s, kind="stable")[:7]].tolist())
        np.testing.assert_allclose(sims[i], -np.sort(-s)[:7], rtol=1e-5)
    everything = CentroidIVF(q.top, q.centroids, q.bounds, nprobe=10)  # every group probed = exact search
    _s, exact = everything.search(queries, 1)
    np.testing.assert_array_equal(exact[:, 0], (queries @ q.centroids.T).argmax(1))


def test_fixed_list_size_and_centroid_ivf_quantizer(tmp_path, rng) -> None:
    """list_size fixes the list size (nlist = n / list_size); with every group and list probed the ivf quantizer's
    graph is the exact one, with fewer it is a subset."""
    from curation.index import choose_nlist, choose_nprobe

    assert [choose_nlist(n, IndexConfig(list_size=256)) for n in (100, 256, 257, 1_000_000)] == [1, 1, 2, 3907]
    share = IndexConfig(nprobe=3, probe_share=0.5)  # probe_share ties nprobe to nlist and overrides nprobe
    assert [choose_nprobe(nl, share) for nl in (1, 3, 512, 2049)] == [1, 2, 256, 1025]
    assert [choose_nprobe(nl, IndexConfig(nprobe=3)) for nl in (1, 3, 512)] == [1, 3, 3]
    assert choose_nlist(10_000, IndexConfig()) == 256 and choose_nlist(10_000, IndexConfig(nlist=7, list_size=5)) == 7
    x = _clustered(rng)
    views = np.stack([x, x[:, ::-1]], 1)
    base = RowView(x)

    def edges(cfg: IndexConfig) -> tuple[set, dict]:
        index = build_index(base, cfg, seed=0, work_dir=tmp_path)
        e = knn_edges(index, views, k=5, threshold=0.8)
        return set(zip(e.src.tolist(), e.dst.tolist(), strict=True)), index.params

    exact, _ = edges(IndexConfig(kind="flat"))
    full, params = edges(IndexConfig(kind="ivf_blocks", list_size=100, nprobe=40, quantizer="ivf", quantizer_nprobe=6))
    assert (params["nlist"], params["quantizer_groups"], params["quantizer_nprobe"]) == (31, 5, 5)  # 30: rounding, split
    assert full == exact and len(exact) == 13621
    part, params = edges(IndexConfig(kind="ivf_blocks", list_size=100, nprobe=2, quantizer="ivf", quantizer_nprobe=1))
    assert (len(part), len(part & exact)) == (13152, 12580)


def test_pca_whitening_runs_through_the_stage(tmp_path) -> None:
    """pcaw fitted on the pool's whole-image descriptors: the index holds the whitened vectors; planted set intact."""
    from curation.descriptors import Whitener

    shards, ev = _planted(tmp_path)
    out = tmp_path / "dedup"
    desc = {**PIXEL["descriptor"], "whitening": "pcaw", "whitening_dim": 8}
    res = dedup(shards, ev, out, DedupConfig.model_validate({**PIXEL, "descriptor": desc, "threshold": 0.9,
                                                             "eval_threshold": 0.9}), ShardTracker("dedup", out))  # fmt: skip
    raw = np.concatenate([np.load(out / "descriptors" / f"{s.name}.npy") for s in shards]).astype(np.float32)
    ref = Whitener.fit(raw[:, 0], "pcaw", 8)(raw[:, 0])
    index_vectors = np.load(out / "index_vectors.npy").astype(np.float32)
    assert index_vectors.shape == (21, 8) and res.extra["whitening"] == "pcaw"
    np.testing.assert_allclose(index_vectors, ref, atol=2e-3)  # fp16 storage
    comp = pd.read_parquet(out / COMPONENTS).set_index("row_id")
    multi = sorted(sorted(int(r) for r in rows) for rows in comp.groupby("representative").groups.values() if len(rows) > 1)
    assert multi == [[1, 12], [2, 13, 16], [3, 14], [4, 15], [17, 20]]
    assert sorted(pd.read_parquet(out / KEPT)["row_id"].tolist()) == list(range(12))
    assert res.counts["edges"] == 14 and res.counts["eval_edges"] == 8


def test_sscd_backend_from_a_torchvision_checkpoint_runs_the_stage(tmp_path) -> None:
    """The stage loads a (tiny) SSCD state dict, describes with the in-project model, and finds the planted set."""
    from curation.descriptors import SSCDDescriptor, describe
    from curation.models.sscd import export_torchvision
    from infra.images import decode
    from infra.shards import iter_shard_images
    from infra.storage import sha256_file
    from tests.curation.test_sscd import _model

    shards, ev = _planted(tmp_path)
    model = _model()  # resnet18 trunk, 32-d: the release layout at test size
    path = export_torchvision(model, tmp_path / "tiny.torchvision.pt")
    desc = {"backend": "sscd", "path": str(path), "arch": "resnet18", "dims": 32, "image_size": 64, "precision": "fp32",
            "views": [1.0, 0.86], "flip": True}  # fmt: skip
    cfg = DedupConfig.model_validate({"descriptor": desc, "threshold": 0.997, "eval_threshold": 0.997})
    out = tmp_path / "dedup"
    res = dedup(shards, ev, out, cfg, ShardTracker("dedup", out))
    assert res.extra["descriptor"] == "sscd:tiny.torchvision.pt:square64" and res.extra["model_sha256"] == sha256_file(path)
    images = [decode(data) for _, data in iter_shard_images(shards[0])]
    ref = describe(images, SSCDDescriptor(model, "ref", 64, precision="fp32"), cfg.descriptor)
    np.testing.assert_allclose(np.load(out / "descriptors" / "00000.npy").astype(np.float32), ref, atol=2e-3)
    comp = pd.read_parquet(out / COMPONENTS).set_index("row_id")
    multi = sorted(sorted(int(r) for r in rows) for rows in comp.groupby("representative").groups.values() if len(rows) > 1)
    assert multi == [[1, 12], [2, 13, 16], [3, 14], [4, 15], [17, 20]]
    assert res.counts["dropped"] == {"near_duplicate": 6, "eval_contamination": 3} and res.counts["edges"] == 12
