"""Every checked-in config parses; the curation keys of the demo and of the paper overlay hold the intended values."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses(path: Path) -> None:
    load_config(path)


def test_demo_curation_keys() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    d = cfg.dedup
    assert (d.descriptor.backend, d.descriptor.size, d.descriptor.views, d.descriptor.flip) == ("pixel", 16, [1.0, 0.86], True)
    assert (d.k, d.threshold, d.eval_threshold, d.representative) == (64, 0.995, 0.992, "first_row")
    assert (cfg.retrieve.n_neighbors, cfg.retrieve.pool_clusters, cfg.retrieve.min_queries) == (4, 100, 3)
    assert (cfg.rebalance.n_clusters, cfg.rebalance.target_size) == ([64, 8], 1500)


def test_paper_overlay_keeps_the_paper_numbers() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "curation" / "lvd142m.yaml")
    assert (cfg.dedup.k, cfg.dedup.threshold, cfg.dedup.eval_threshold) == (64, 0.6, 0.45)
    assert (cfg.dedup.descriptor.backend, cfg.dedup.descriptor.dims, cfg.dedup.descriptor.size) == ("sscd", 512, 320)
    r = cfg.retrieve
    assert (r.n_neighbors, r.datasets["imagenet-1k"].n_neighbors, r.pool_clusters, r.min_queries) == (4, 32, 100_000, 3)
    assert (r.images_per_cluster, r.max_per_dataset, r.index.kind) == (10_000, 1_000_000, "ivfpq")
    assert (cfg.embed.backbone.arch, cfg.embed.backbone.patch_size) == ("vit_huge", 16)
    assert cfg.rebalance.n_clusters == [10_000_000, 500_000, 50_000, 10_000]
    assert [cfg.rebalance.steps(t) for t in range(4)] == [1, 10, 10, 10]
    assert [cfg.rebalance.sample_size(t) for t in range(4)] == [1, 10, 5, 3]
