"""Retrieval: exact against brute force, approximate with exact re-scoring and measured recall, cluster rules."""

from __future__ import annotations

import numpy as np
import pandas as pd

from curation.index import build_index, default_nlist, exact_search, recall_at_k
from curation.retrieve import HITS, RETRIEVED, SEED_STATS, SeedQueries, retrieve, sample_based, settings
from curation.vectors import RowView, VectorStore
from infra.config.curation import IndexConfig, RetrieveConfig
from infra.config.data import SeedSetConfig


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _seeds(tmp_path, name: str, emb: np.ndarray, method: str = "sample", **kw) -> SeedQueries:
    meta = pd.DataFrame({"image_id": [f"{name}-q{i}" for i in range(len(emb))], "name": "", "label": 0})
    store = VectorStore.from_array(emb, tmp_path / f"{name}.npy")
    return SeedQueries(SeedSetConfig(name=name, path=tmp_path, retrieval=method, **kw), meta, store)


def _pool(tmp_path, emb: np.ndarray) -> tuple[pd.DataFrame, RowView]:
    meta = pd.DataFrame({"image_id": [f"p{i}" for i in range(len(emb))], "row_id": range(len(emb)), "shard": "00000"})
    return meta, RowView(VectorStore.from_array(emb, tmp_path / "pool.npy"))


def test_flat_sample_retrieval_equals_brute_force(tmp_path, rng) -> None:
    pool_emb, q = _unit(rng, 600, 32), _unit(rng, 40, 32)
    _, pool = _pool(tmp_path, pool_emb)
    seeds = _seeds(tmp_path, "s", q)
    pool_emb, q = pool.take(np.arange(600)), seeds.emb.read_all()  # the stored (fp16) vectors are the reference
    index = build_index(pool, IndexConfig(kind="flat"))
    hits = sample_based(index, seeds, 5)
    sims = q.astype(np.float64) @ pool_emb.T.astype(np.float64)
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    assert hits["pos"].to_numpy().reshape(40, 5).tolist() == ref.tolist()
    np.testing.assert_allclose(hits["similarity"].to_numpy().reshape(40, 5), np.take_along_axis(sims, ref, 1), atol=1e-5)
    _s, i = exact_search(pool, q, 5, chunk=128)  # the chunked brute force used for recall
    assert i.tolist() == ref.tolist()


def test_ivfpq_scores_are_exact_and_recall_is_measured(tmp_path, rng) -> None:
    centres = _unit(rng, 20, 32)
    pool_emb = centres[rng.integers(0, 20, 12_000)] + 0.5 * _unit(rng, 12_000, 32)
    pool_emb /= np.linalg.norm(pool_emb, axis=1, keepdims=True)
    _, pool = _pool(tmp_path, pool_emb)
    cfg = IndexConfig(kind="ivfpq", nlist=32, nprobe=8, pq_m=8, pq_nbits=8, refine_factor=4)
    index = build_index(pool, cfg, seed=0)
    q = _unit(rng, 200, 32)
    sims, ids = index.search(q, 4)
    exact = np.einsum("qd,qkd->qk", q, pool.take(ids.ravel()).reshape(200, 4, 32))
    np.testing.assert_allclose(sims, exact, rtol=1e-6)  # similarities re-scored from the stored vectors
    assert (np.diff(sims, axis=1) <= 0).all()
    assert index.params == {"kind": "ivfpq", "n": 12_000, "pq_m": 8, "pq_nbits": 8, "refine_factor": 4, "nlist": 32,
                            "nprobe": 8, "train_size": 12_000}  # fmt: skip
    assert round(recall_at_k(index, q, 4), 4) == 0.9137


def test_default_nlist() -> None:
    assert [default_nlist(n) for n in (100, 10_000, 1_000_000, 10**9)] == [2, 256, 4096, 131072]


def test_settings_precedence(tmp_path) -> None:
    cfg = RetrieveConfig(datasets={"in1k": {"n_neighbors": 32, "max_images": 5}})
    in1k = SeedSetConfig(name="in1k", path=tmp_path, n_neighbors=8)
    other = SeedSetConfig(name="other", path=tmp_path, n_neighbors=8)
    assert (settings(in1k, cfg).n_neighbors, settings(in1k, cfg).max_images) == (32, 5)
    assert (settings(other, cfg).n_neighbors, settings(other, cfg).max_images) == (8, 1_000_000)


def test_cluster_based_rules_and_collisions(tmp_path, rng) -> None:
    """4 separated pool clusters of 30; queries 5/4/3/0 per cluster: > 3 queries -> clusters 0 and 1 contribute
    10 each; the cap of 15 then subsamples. A sample-based set beside it collides on shared images."""
    centres = np.eye(4, dtype=np.float32) * 10
    pool_emb = np.repeat(centres, 30, 0) + 0.1 * rng.standard_normal((120, 4)).astype(np.float32)
    q = np.concatenate([np.repeat(centres[[0]], 5, 0), np.repeat(centres[[1]], 4, 0), np.repeat(centres[[2]], 3, 0)])
    q = q + 0.1 * rng.standard_normal(q.shape).astype(np.float32)
    meta, pool = _pool(tmp_path, pool_emb)
    cfg = RetrieveConfig(pool_clusters=4, images_per_cluster=10, max_per_dataset=15, index={"kind": "flat"})
    seeds = [_seeds(tmp_path, "small", q, "cluster"), _seeds(tmp_path, "nn", q[:2], "sample", n_neighbors=40),
             _seeds(tmp_path, "curated", q[:0], "as_is")]  # fmt: skip
    res = retrieve(meta, pool, seeds, tmp_path / "out", cfg, seed=0)
    hits = pd.read_parquet(tmp_path / "out" / HITS)
    small = hits[hits["seed_set"] == "small"]
    assert len(small) == 15 and small["pos"].is_unique
    assert set((small["pos"] // 30).tolist()) == {0, 1}  # only the pool clusters holding > 3 queries
    nn = hits[hits["seed_set"] == "nn"]
    assert (nn.groupby("query").head(30)["pos"] // 30 == 0).all()  # each query's 30 nearest: all of cluster 0
    stats = pd.read_parquet(tmp_path / "out" / SEED_STATS).set_index("seed_set")
    assert stats.loc["nn", "collisions"] == 32 and stats.loc["nn", "max_hits_per_image"] == 2
    assert stats.loc["curated", "retrieved"] == 0 and stats.loc["small", "retrieved"] == 15
    # within nn, both queries share cluster 0's 30 images and 2 of their 10 further neighbours (32, above);
    # across sets, "small" also hits 2 images that nn hit once
    assert res.extra["collisions"] == {"images_hit_more_than_once": 34, "max_hits_per_image": 3}
    assert (hits.groupby("pos").size() > 1).sum() == 34
    retrieved = pd.read_parquet(tmp_path / "out" / RETRIEVED)
    assert sorted(retrieved["pos"]) == sorted(set(hits["pos"]))
    assert res.counts["kept"] + res.counts["dropped"]["not_retrieved"] == 120


def test_every_pool_image_has_one_retrieval_outcome(tmp_path, rng) -> None:
    meta, pool = _pool(tmp_path, _unit(rng, 50, 8))
    retrieve(meta, pool, [_seeds(tmp_path, "s", _unit(rng, 3, 8))], tmp_path / "out", RetrieveConfig(n_neighbors=2))
    ledger = pd.read_parquet(tmp_path / "out" / "ledger")
    retrieved = set(ledger.loc[ledger["reason"] == "retrieved", "row_id"])
    dropped = set(ledger.loc[ledger["reason"] == "not_retrieved", "row_id"])
    assert retrieved | dropped == set(range(50)) and not retrieved & dropped
    assert len(ledger[ledger["reason"] == "retrieved"]) == 6


def test_stage_records_the_recall_of_an_ivfpq_index(tmp_path, rng) -> None:
    """retrieve() with an approximate index: recall@N against brute force per sample-based set, in the manifest."""
    from infra.manifest import StageManifest, read_manifest, write_manifest

    centres = _unit(rng, 20, 32)
    pool_emb = centres[rng.integers(0, 20, 12_000)] + 0.5 * _unit(rng, 12_000, 32)
    meta, pool = _pool(tmp_path, pool_emb / np.linalg.norm(pool_emb, axis=1, keepdims=True))
    index = {"kind": "auto", "flat_max": 10_000, "large": "ivfpq", "nlist": 32, "nprobe": 8, "pq_m": 8, "refine_factor": 4,
             "recall_sample": 150}  # fmt: skip
    cfg = RetrieveConfig(index=index, pool_clusters=5)
    seeds = [_seeds(tmp_path, "s", _unit(rng, 200, 32)), _seeds(tmp_path, "in1k", _unit(rng, 40, 32), n_neighbors=8),
             _seeds(tmp_path, "cl", _unit(rng, 30, 32), "cluster")]  # fmt: skip
    res = retrieve(meta, pool, seeds, tmp_path / "out", cfg, seed=0)
    assert res.extra["index"]["kind"] == "ivfpq" and res.extra["index"]["nlist"] == 32
    assert res.extra["recall"] == {"s": {"recall_at_n": 0.9283, "queries": 150, "n": 4},
                                   "in1k": {"recall_at_n": 0.9656, "queries": 40, "n": 8}}  # fmt: skip
    # the recorded value is recall_at_k on the same query sample (the first draw of the stage's seeded rng)
    q = seeds[0].emb.take(np.sort(np.random.default_rng(0).choice(200, 150, replace=False)))
    assert round(recall_at_k(build_index(pool, IndexConfig(**index), seed=0), q, 4), 4) == 0.9283
    write_manifest(tmp_path, StageManifest(stage="retrieve", run_id="r", config_hash="c", code_version="v",
                                           inputs_digest="i", started_at="s", finished_at="f", extra=res.extra))  # fmt: skip
    assert read_manifest(tmp_path).extra["recall"] == res.extra["recall"]
    flat = retrieve(meta, pool, seeds[:1], tmp_path / "flat", RetrieveConfig(index={"kind": "flat"}), seed=0)
    assert flat.extra["recall"] == {}  # exact search: nothing to measure


def test_pool_kmeans_fits_on_a_sample_with_kmeans_plus_plus_on_a_smaller_one(tmp_path, rng) -> None:
    """Cluster-based retrieval at scale: k-means++ on `kmeans_init_sample`, Lloyd on `kmeans_sample`, all assigned."""
    from curation.kmeans import kmeans
    from curation.retrieve import pool_clusters

    centres = _unit(rng, 12, 8) * 3
    _, pool = _pool(tmp_path, centres[rng.integers(0, 12, 5000)] + 0.3 * rng.standard_normal((5000, 8)).astype(np.float32))
    cfg = RetrieveConfig(pool_clusters=12, kmeans_sample=1000, kmeans_init_sample=100, kmeans_iters=10)
    got = pool_clusters(pool, cfg, seed=3)
    x = pool.take(np.arange(5000))
    r = np.random.default_rng(3)  # the same draws: fit rows, then the init rows inside kmeans()
    rows = np.sort(r.choice(5000, 1000, replace=False))
    ref = kmeans(x[rows], 12, 10, r, init_sample=100)
    np.testing.assert_array_equal(got.centroids, ref.centroids)
    d2 = ((x[:, None, :] - got.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(got.assign, d2.argmin(1))  # every pool image at its nearest centroid
    assert sum(len(m) for m in got.members) == 5000 and np.bincount(got.assign, minlength=12).min() > 0
    no_init_sample = pool_clusters(pool, cfg.model_copy(update={"kmeans_init_sample": None}), seed=3)
    assert not np.array_equal(no_init_sample.centroids, got.centroids)  # the init sample does change the seeding
    meta, _ = _pool(tmp_path, x)
    res = retrieve(meta, pool, [_seeds(tmp_path, "cl", x[:20], "cluster")], tmp_path / "out", cfg, seed=3)
    assert res.extra["pool_kmeans"] == {"fit_sample": 1000, "init_sample": 100} and res.extra["pool_clusters"] == 12
