"""The whole curation (dedup -> embed -> retrieve -> rebalance -> corpus) is deterministic under a fixed seed,
and every pool row ends with exactly one terminal lineage event."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from curation.corpus import MANIFEST_TABLE, build_corpus
from curation.dedup import KEPT, dedup
from curation.embed import embed, pool_store, seed_store
from curation.rebalance import SELECTED, rebalance
from curation.retrieve import RETRIEVED, SEED_STATS, SeedQueries, retrieve
from curation.vectors import RowView
from infra.config.curation import CorpusConfig, DedupConfig, RebalanceConfig, RetrieveConfig
from infra.config.data import EvalSetConfig, SeedSetConfig
from infra.features import Embedder
from infra.stage import ShardTracker
from tests.curation.conftest import VARIANTS, blob_image, png, write_folder, write_pool

DEDUP = {"descriptor": {"backend": "pixel", "views": [1.0, 0.86], "flip": True}, "threshold": 0.995,
         "eval_threshold": 0.995}  # fmt: skip


def _inputs(root: Path) -> tuple[list, list[EvalSetConfig], list[SeedSetConfig]]:
    originals = [blob_image(i) for i in range(60)]
    items = [png(im) for im in originals] + [VARIANTS[v](originals[i]) for i, v in ((3, "jpeg"), (7, "crop"), (9, "flip"))]
    items.append(VARIANTS["crop"](blob_image(500)))  # a copy of an evaluation image
    shards = write_pool(root / "pool", items, shard_size=16)
    ev = EvalSetConfig(name="ev", train=write_folder(root / "ev_train", {"0": [blob_image(501)]}),
                       test=write_folder(root / "ev_test", {"0": [blob_image(500)]}))  # fmt: skip
    seeds_root = write_folder(root / "seeds", {"a": [blob_image(1000 + i) for i in range(6)]})
    seeds = [SeedSetConfig(name="nn", path=seeds_root, retrieval="sample", n_neighbors=5, include_as_is=True),
             SeedSetConfig(name="cl", path=seeds_root, retrieval="cluster")]  # fmt: skip
    return shards, [ev], seeds


def _curate(root: Path, out: Path, seed: int) -> dict[str, str]:
    shards, ev, seeds = _inputs(root)
    st = {s: out / s for s in ("dedup", "embed", "retrieve", "rebalance", "corpus")}
    dedup(shards, ev, st["dedup"], DedupConfig.model_validate(DEDUP), ShardTracker("dedup", st["dedup"]), seed=seed)
    keep = set(pd.read_parquet(st["dedup"] / KEPT)["image_id"])

    def make() -> Embedder:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.GELU(), torch.nn.Flatten(), torch.nn.Linear(392, 16))
        return Embedder(net, 28, "toy", 16, "bf16")

    embed(shards, keep, seeds, st["embed"], make, ShardTracker("embed", st["embed"]), "cpu")
    meta, pool = pool_store(st["embed"])
    queries = [SeedQueries(s, *seed_store(st["embed"], s.name)) for s in seeds]
    retrieve(meta, RowView(pool), queries, st["retrieve"], RetrieveConfig(pool_clusters=6, images_per_cluster=4, min_queries=0), seed)
    got = pd.read_parquet(st["retrieve"] / RETRIEVED)
    cfg = RebalanceConfig(n_clusters=[8, 3], n_resampling_steps=[3, 2], sample_sizes=[2, 1], target_size=20, n_iter=10)
    rebalance(got.drop(columns=["pos"]), RowView(pool, got["pos"].to_numpy()), st["rebalance"], cfg, seed)
    sel = pd.read_parquet(st["rebalance"] / SELECTED)
    build_corpus(sel[sel["selected"]], root / "pool", [seeds[0]], pd.read_parquet(st["retrieve"] / SEED_STATS),
                 st["corpus"], CorpusConfig(shard_size=16))
    files = [st["dedup"] / KEPT, st["dedup"] / "edges.parquet", st["retrieve"] / RETRIEVED, st["rebalance"] / SELECTED,
             st["corpus"] / MANIFEST_TABLE, *sorted((st["corpus"] / "shards").glob("*")), *sorted(st["embed"].glob("pool/*.npy"))]  # fmt: skip
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_same_seed_same_corpus_and_complete_lineage(tmp_path) -> None:
    a = _curate(tmp_path / "in_a", tmp_path / "a", seed=0)
    b = _curate(tmp_path / "in_b", tmp_path / "b", seed=0)
    assert a == b and len(a) == 13
    c = _curate(tmp_path / "in_c", tmp_path / "c", seed=1)
    assert c["rebalance/selected.parquet"] != a["rebalance/selected.parquet"]  # the seed does reach the sampling
    ledgers = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "a").glob("*/ledger/*.parquet"))])
    pool_rows = ledgers[ledgers["row_id"].notna()]
    terminal = pool_rows[pool_rows["kind"].isin(["drop", "keep"])].groupby("row_id").size()
    assert sorted(terminal.index.astype(int)) == list(range(64)) and (terminal == 1).all()
    reasons = pool_rows[pool_rows["kind"].isin(["drop", "keep"])].groupby(["stage", "reason"]).size().to_dict()
    assert reasons[("dedup", "near_duplicate")] == 3 and reasons[("dedup", "eval_contamination")] == 1
    assert reasons[("corpus", "in_corpus")] == 20
    info = pool_rows[pool_rows["kind"] == "info"].groupby("reason")["row_id"].nunique().to_dict()
    assert info["dup_component"] == 64 and np.isclose(info["cluster"], reasons[("corpus", "in_corpus")] + reasons[("rebalance", "not_sampled")])
