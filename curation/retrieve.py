"""Retrieval from the pool with curated seed sets (paper §3, App. A.4).

- ``sample``: the N nearest pool images of every query image (N=4 by default; 32 for the ImageNet-1k role);
- ``cluster``: k-means on the pool (fitted on a sample, every pool image assigned); every cluster holding more
  than ``min_queries`` (3) query images contributes ``images_per_cluster`` pool images sampled at random, and a
  dataset's total is capped at ``max_images`` (1M in the paper) by uniform subsampling;
- ``as_is``: nothing is retrieved; the set itself goes into the corpus.

Without seed sets that retrieve (``mode="pool"``) nothing is searched: every deduplicated pool image is passed on to
rebalancing, whose clustering-based balanced sampling needs no seeds (Vo et al. 2024); the ledger says so per image
(``whole_pool``) and the composition table has one ``(pool)`` row.

The pool index is chosen by scale (exact Flat, IVF-PQ beyond ``index.flat_max``); when it is approximate, the
recall@N of sample-based retrieval against brute force is measured on a sample of queries and recorded.
A pool image hit by several queries is a collision; collisions are counted per seed set and overall.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from curation.index import SearchIndex, build_index, recall_at_k
from curation.kmeans import assign, kmeans
from curation.vectors import RowView, VectorStore
from infra.config.curation import RetrieveConfig
from infra.config.data import SeedSetConfig
from infra.lineage import LedgerParts, ledger_dir
from infra.stage import StageResult
from infra.storage import atomic_path

RETRIEVED = "retrieved.parquet"
HITS = "hits.parquet"
SEED_STATS = "seed_stats.parquet"
HIT_COLUMNS = ["pos", "query", "similarity", "cluster"]
WHOLE_POOL = "(pool)"  # the seed_set of pool images passed on without retrieval (not a valid seed-set name)


@dataclass
class SeedQueries:
    cfg: SeedSetConfig
    meta: pd.DataFrame  # image_id, name, label
    emb: VectorStore  # (Q, D) L2-normalised


@dataclass
class Settings:
    n_neighbors: int
    images_per_cluster: int
    max_images: int


def settings(seed: SeedSetConfig, cfg: RetrieveConfig) -> Settings:
    """Per-dataset values: ``retrieve.datasets[name]`` > the seed set's own ``n_neighbors`` > the defaults."""
    o = cfg.datasets.get(seed.name)
    n = (o.n_neighbors if o and o.n_neighbors else None) or seed.n_neighbors or cfg.n_neighbors
    m = (o.images_per_cluster if o and o.images_per_cluster else None) or cfg.images_per_cluster
    cap = (o.max_images if o and o.max_images else None) or cfg.max_per_dataset
    return Settings(n, m, cap)


def sample_based(index: SearchIndex, seeds: SeedQueries, n: int, chunk: int = 16_384) -> pd.DataFrame:
    """One row per (query, retrieved pool position) with the exact cosine similarity."""
    parts = []
    qids = seeds.meta["image_id"].to_numpy()
    for start, q in seeds.emb.chunks(chunk):
        sims, idx = index.search(q, n)
        rows = np.repeat(np.arange(start, start + len(q)), idx.shape[1])
        parts.append(pd.DataFrame({"pos": idx.ravel(), "query": qids[rows], "similarity": sims.ravel(), "cluster": -1}))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=HIT_COLUMNS)
    return out[out["pos"] >= 0].reset_index(drop=True)


@dataclass
class PoolClusters:
    centroids: np.ndarray  # (K, D)
    assign: np.ndarray  # (N,) cluster of every pool image
    members: list[np.ndarray]


def pool_clusters(pool: RowView, cfg: RetrieveConfig, seed: int) -> PoolClusters:
    """k-means on the pool: fitted on at most ``kmeans_sample`` images (k-means++ on at most ``kmeans_init_sample``
    of them), then every pool image assigned chunk by chunk (paper A.4: 100,000 clusters at 1B scale)."""
    rng = np.random.default_rng(seed)
    n = len(pool)
    rows = np.arange(n) if n <= cfg.kmeans_sample else np.sort(rng.choice(n, cfg.kmeans_sample, replace=False))
    km = kmeans(pool.take(rows), cfg.pool_clusters, cfg.kmeans_iters, rng, init_sample=cfg.kmeans_init_sample)
    a = km.assign if len(rows) == n else assign(pool.chunks(), km.centroids, n)[0]
    order = np.argsort(a, kind="stable")
    bounds = np.searchsorted(a[order], np.arange(len(km.centroids) + 1))
    return PoolClusters(km.centroids, a, [order[bounds[c] : bounds[c + 1]] for c in range(len(km.centroids))])


def cluster_based(pool: RowView, clusters: PoolClusters, seeds: SeedQueries, s: Settings, min_queries: int,
                  rng: np.random.Generator) -> pd.DataFrame:  # fmt: skip
    """Clusters with > min_queries queries contribute up to images_per_cluster random members each; capped.

    Each retrieved image is attributed to its most similar query among the queries of its cluster.
    """
    q_emb = seeds.emb.read_all()
    q_assign = assign([(0, q_emb)], clusters.centroids, len(q_emb))[0]
    qids = seeds.meta["image_id"].to_numpy()
    parts = []
    for c in np.flatnonzero(np.bincount(q_assign, minlength=len(clusters.centroids)) > min_queries):
        members = clusters.members[c]
        take = np.sort(rng.choice(members, min(s.images_per_cluster, len(members)), replace=False))
        in_c = np.flatnonzero(q_assign == c)
        sims = pool.take(take) @ q_emb[in_c].T  # taken, queries of the cluster
        best = sims.argmax(1)
        parts.append(pd.DataFrame({"pos": take, "query": qids[in_c[best]], "similarity": sims.max(1), "cluster": int(c)}))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=HIT_COLUMNS)
    if len(out) > s.max_images:
        out = out.iloc[np.sort(rng.choice(len(out), s.max_images, replace=False))].reset_index(drop=True)
    return out


def whole_pool(pool_meta: pd.DataFrame, seed_sets: list[SeedQueries], stage_dir: Path) -> StageResult:
    """No retrieval: every pool image goes on to rebalancing (``mode="pool"``)."""
    n = len(pool_meta)
    hits = pd.DataFrame({"pos": np.arange(n), "query": None, "similarity": np.nan, "cluster": -1})
    stats = [{"seed_set": WHOLE_POOL, "method": "pool", "queries": None, "n_neighbors": None, "hits": n,
              "retrieved": n, "collisions": 0, "max_hits_per_image": int(n > 0)}]  # fmt: skip
    stats += [{"seed_set": s.cfg.name, "method": s.cfg.retrieval, "queries": len(s.meta), "n_neighbors": None, "hits": 0,
               "retrieved": 0, "collisions": 0, "max_hits_per_image": 0} for s in seed_sets]  # fmt: skip
    return _record(pool_meta, [hits.assign(seed_set=WHOLE_POOL, method="pool")], stats, stage_dir,
                   {"mode": "pool", "index": None, "recall": {}, "pool_clusters": None, "pool_kmeans": None})


def retrieve(pool_meta: pd.DataFrame, pool: RowView, seed_sets: list[SeedQueries], stage_dir: Path,
             cfg: RetrieveConfig, seed: int = 0, mode: str = "seeds") -> StageResult:  # fmt: skip
    """``mode``: ``seeds`` (retrieval around the seed sets) or ``pool`` (:func:`whole_pool`)."""
    if mode == "pool":
        return whole_pool(pool_meta, seed_sets, stage_dir)
    rng = np.random.default_rng(seed)
    active = {s.cfg.name for s in seed_sets if s.cfg.retrieval != "as_is" and len(pool)}
    methods = {s.cfg.retrieval for s in seed_sets if s.cfg.name in active}
    index = build_index(pool, cfg.index, seed, stage_dir / "index") if "sample" in methods else None
    clusters = pool_clusters(pool, cfg, seed) if "cluster" in methods else None
    hits, stats, recall = [], [], {}
    for s in seed_sets:
        st = settings(s.cfg, cfg)
        row = {"seed_set": s.cfg.name, "method": s.cfg.retrieval, "queries": len(s.meta), "n_neighbors": None,
               "hits": 0, "retrieved": 0, "collisions": 0, "max_hits_per_image": 0}  # fmt: skip
        if s.cfg.name in active and s.cfg.retrieval == "sample":
            assert index is not None
            h = sample_based(index, s, st.n_neighbors)
            row["n_neighbors"] = st.n_neighbors
            if index.kind != "flat":  # approximate: measure against brute force
                recall[s.cfg.name] = _recall(index, s, st.n_neighbors, cfg, rng)
        elif s.cfg.name in active:
            assert clusters is not None
            h = cluster_based(pool, clusters, s, st, cfg.min_queries, rng)
        else:
            stats.append(row)
            continue
        per_pos = h.groupby("pos").size()
        row.update(hits=len(h), retrieved=len(per_pos), collisions=int((per_pos > 1).sum()),
                   max_hits_per_image=int(per_pos.max()) if len(per_pos) else 0)  # fmt: skip
        stats.append(row)
        hits.append(h.assign(seed_set=s.cfg.name, method=s.cfg.retrieval))
    if index is not None:
        index.close()
    fit = min(len(pool), cfg.kmeans_sample)  # points k-means is fitted on; k-means++ on at least k of them
    init = fit if cfg.kmeans_init_sample is None else min(fit, max(cfg.kmeans_init_sample, cfg.pool_clusters))
    kmeans_info = {"fit_sample": fit, "init_sample": init}
    extra = {"mode": "seeds", "index": index.params if index else None, "recall": recall,
             "pool_clusters": len(clusters.centroids) if clusters else None,
             "pool_kmeans": kmeans_info if clusters else None}  # fmt: skip
    return _record(pool_meta, hits, stats, stage_dir, extra)


def _recall(index: SearchIndex, s: SeedQueries, n: int, cfg: RetrieveConfig, rng: np.random.Generator) -> dict:
    q = min(len(s.meta), cfg.index.recall_sample)
    rows = np.sort(rng.choice(len(s.meta), q, replace=False))
    return {"recall_at_n": round(recall_at_k(index, s.emb.take(rows), n), 4), "queries": int(q), "n": n}


def _record(pool_meta: pd.DataFrame, hits: list[pd.DataFrame], stats: list[dict], stage_dir: Path,
            extra: dict) -> StageResult:  # fmt: skip
    cols = [*HIT_COLUMNS, "seed_set", "method"]
    allhits = pd.concat(hits, ignore_index=True) if hits else pd.DataFrame(columns=cols)
    allhits["n_hits"] = allhits.groupby("pos")["query"].transform("size")
    best = allhits.sort_values(["pos", "similarity"], ascending=[True, False], kind="stable").drop_duplicates("pos")
    selected = pool_meta.iloc[best["pos"].to_numpy()].reset_index(drop=True)
    best_cols = best[["pos", "seed_set", "method", "query", "similarity", "n_hits"]].reset_index(drop=True)
    selected = pd.concat([selected, best_cols], axis=1)
    ledger = LedgerParts("retrieve", ledger_dir(stage_dir))
    joined = allhits.merge(pool_meta[["image_id", "row_id"]], left_on="pos", right_index=True)
    for h in joined.itertuples(index=False):
        if h.method == "pool":
            ledger.info("whole_pool", row_id=int(h.row_id), image_id=h.image_id,
                        detail={"seed_set": WHOLE_POOL, "why": "no seed set retrieves: every deduplicated pool image "
                                                                "goes to rebalancing"})  # fmt: skip
            continue
        ledger.info("retrieved", row_id=int(h.row_id), image_id=h.image_id,
                    detail={"seed_set": h.seed_set, "method": h.method, "query": h.query, "cluster": int(h.cluster),
                            "similarity": round(float(h.similarity), 6), "n_hits": int(h.n_hits)})  # fmt: skip
    chosen = np.zeros(len(pool_meta), bool)
    chosen[best["pos"].to_numpy(dtype=np.int64)] = True
    for r in pool_meta[~chosen].itertuples(index=False):
        ledger.drop("not_retrieved", row_id=int(r.row_id), image_id=r.image_id)
    parts = ledger.close()
    with atomic_path(stage_dir / RETRIEVED) as tmp:
        selected.to_parquet(tmp, index=False)
    with atomic_path(stage_dir / HITS) as tmp:
        allhits.to_parquet(tmp, index=False)
    with atomic_path(stage_dir / SEED_STATS) as tmp:
        pd.DataFrame(stats).to_parquet(tmp, index=False)
    per_pos = allhits.groupby("pos").size()
    collisions = {"images_hit_more_than_once": int((per_pos > 1).sum()), "max_hits_per_image": int(per_pos.max()) if len(per_pos) else 0}
    return StageResult(
        counts={"input": len(pool_meta), "kept": len(selected), "dropped": {"not_retrieved": int((~chosen).sum())}, "hits": len(allhits)},
        outputs=[stage_dir / RETRIEVED, stage_dir / HITS, stage_dir / SEED_STATS, *parts],
        extra={**extra, "seed_sets": stats, "collisions": collisions},
    )
