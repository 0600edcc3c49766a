"""Retrieval from the pool with curated seed sets (paper §3, App. A.4).

- ``sample``: the N nearest pool images of every query image (N=4 by default; 32 for the ImageNet-1k role);
- ``cluster``: k-means on the pool; every cluster holding more than ``min_queries`` (3) query images contributes
  ``images_per_cluster`` pool images (sampled), capped per dataset;
- ``as_is``: nothing is retrieved; the set itself goes into the corpus.

A pool image retrieved by several queries is a "collision"; collisions are counted per seed set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from infra.config.curation import RetrieveConfig
from infra.config.data import SeedSetConfig
from infra.lineage import LedgerWriter
from infra.stage import StageResult
from infra.storage import atomic_path

RETRIEVED = "retrieved.parquet"


@dataclass
class SeedEmbeddings:
    cfg: SeedSetConfig
    meta: pd.DataFrame  # image_id, name, label
    emb: np.ndarray  # (Q, D) float32, L2-normalised


def flat_index(emb: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb, dtype=np.float32))
    return index


def sample_based(pool_emb: np.ndarray, seeds: SeedEmbeddings, n: int, index: faiss.Index) -> pd.DataFrame:
    """One row per (query, retrieved pool position) with the cosine similarity."""
    k = min(n, len(pool_emb))
    sims, idx = index.search(np.ascontiguousarray(seeds.emb, dtype=np.float32), k)
    q = np.repeat(np.arange(len(seeds.emb)), k)
    out = pd.DataFrame({"pos": idx.ravel(), "query": seeds.meta["image_id"].to_numpy()[q], "similarity": sims.ravel()})
    return out[out["pos"] >= 0]


def cluster_based(pool_emb: np.ndarray, seeds: SeedEmbeddings, cfg: RetrieveConfig, seed: int) -> pd.DataFrame:
    """Pool clusters with > min_queries queries each contribute up to images_per_cluster images."""
    k = min(cfg.pool_clusters, len(pool_emb))
    km = faiss.Kmeans(pool_emb.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
    km.train(np.ascontiguousarray(pool_emb, dtype=np.float32))
    _, pool_c = km.index.search(np.ascontiguousarray(pool_emb, dtype=np.float32), 1)
    q_sims, q_c = km.index.search(np.ascontiguousarray(seeds.emb, dtype=np.float32), 1)
    counts = np.bincount(q_c.ravel(), minlength=k)
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.flatnonzero(counts > cfg.min_queries):
        members = np.flatnonzero(pool_c.ravel() == c)
        take = rng.choice(members, min(cfg.images_per_cluster, len(members)), replace=False)
        query = seeds.meta["image_id"].to_numpy()[np.flatnonzero(q_c.ravel() == c)[0]]
        sims = pool_emb[take] @ km.centroids[c] / max(np.linalg.norm(km.centroids[c]), 1e-6)
        rows.append(pd.DataFrame({"pos": take, "query": query, "similarity": sims, "cluster": int(c)}))
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["pos", "query", "similarity", "cluster"])
    if len(out) > cfg.max_per_dataset:
        out = out.iloc[np.sort(rng.choice(len(out), cfg.max_per_dataset, replace=False))]
    return out


def retrieve(
    pool_meta: pd.DataFrame, pool_emb: np.ndarray, seed_sets: list[SeedEmbeddings], stage_dir: Path,
    cfg: RetrieveConfig, seed: int = 0,
) -> StageResult:  # fmt: skip
    index = flat_index(pool_emb) if len(pool_emb) else None
    hits, stats = [], []
    for s in seed_sets:
        method = s.cfg.retrieval
        if method == "as_is" or index is None:
            stats.append({"seed_set": s.cfg.name, "method": method, "queries": len(s.meta), "retrieved": 0, "collisions": 0})
            continue
        if method == "sample":
            h = sample_based(pool_emb, s, s.cfg.n_neighbors or cfg.n_neighbors, index)
        else:
            h = cluster_based(pool_emb, s, cfg, seed)
        per_pos = h.groupby("pos").size()
        stats.append({"seed_set": s.cfg.name, "method": method, "queries": len(s.meta), "retrieved": int(len(per_pos)),
                      "collisions": int((per_pos > 1).sum())})  # fmt: skip
        hits.append(h.assign(seed_set=s.cfg.name, method=method))
    return _record(pool_meta, hits, stats, stage_dir)


def _record(pool_meta: pd.DataFrame, hits: list[pd.DataFrame], stats: list[dict], stage_dir: Path) -> StageResult:
    allhits = pd.concat(hits, ignore_index=True) if hits else pd.DataFrame(columns=["pos", "query", "similarity", "seed_set", "method"])
    allhits["n_queries"] = allhits.groupby("pos")["query"].transform("size")
    best = allhits.sort_values(["pos", "similarity"], ascending=[True, False], kind="stable").drop_duplicates("pos")
    selected = pool_meta.iloc[best["pos"].to_numpy()].reset_index(drop=True)
    selected = pd.concat([selected, best[["seed_set", "method", "query", "similarity", "n_queries"]].reset_index(drop=True)], axis=1)
    ledger = LedgerWriter("retrieve")
    for h in allhits.merge(pool_meta, left_on="pos", right_index=True).itertuples(index=False):
        ledger.info("retrieved", row_id=int(h.row_id), image_id=h.image_id,
                    detail={"seed_set": h.seed_set, "method": h.method, "query": h.query,
                            "similarity": round(float(h.similarity), 6), "n_queries": int(h.n_queries)})  # fmt: skip
    chosen = set(best["pos"].tolist())
    for pos, r in enumerate(pool_meta.itertuples(index=False)):
        if pos not in chosen:
            ledger.drop("not_retrieved", row_id=int(r.row_id), image_id=r.image_id)
    ledger.write(stage_dir / "ledger" / "retrieve.parquet")
    with atomic_path(stage_dir / RETRIEVED) as tmp:
        selected.to_parquet(tmp, index=False)
    with atomic_path(stage_dir / "seed_stats.parquet") as tmp:
        pd.DataFrame(stats).to_parquet(tmp, index=False)
    return StageResult(
        counts={"input": len(pool_meta), "kept": len(selected), "dropped": {"not_retrieved": len(pool_meta) - len(selected)}},
        outputs=[stage_dir / RETRIEVED, stage_dir / "seed_stats.parquet", stage_dir / "ledger" / "retrieve.parquet"],
        extra={"seed_sets": stats},
    )
