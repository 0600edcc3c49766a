"""Curation: dedup (paper §A.3), embedding, retrieval (§3, §A.4), rebalancing (Vo et al. 2024), corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from infra.config.base import Section


class DescriptorConfig(Section):
    """The copy-detection descriptor used for near-duplicate detection."""

    # pixel: a training-free low-resolution descriptor with flip-invariant search (offline default);
    # sscd: SSCD (ResNet-50 + GeM + 512-d projection) from a local file.
    backend: Literal["pixel", "sscd"] = "pixel"
    path: Path | None = None
    image_size: int = Field(default=16, ge=4)
    batch_size: int = Field(default=256, ge=1)


class DedupConfig(Section):
    enabled: bool = True
    descriptor: DescriptorConfig = Field(default_factory=DescriptorConfig)
    k: int = Field(default=64, ge=1)  # paper §A.3: 64 neighbours
    threshold: float = Field(default=0.6, ge=-1.0, le=1.0)  # paper §A.3: cosine > 0.6
    eval_threshold: float = Field(default=0.45, ge=-1.0, le=1.0)  # paper §A.3: cosine > 0.45
    # Representative of a component: the member with the smallest row_id (first seen in the crawl).
    representative: Literal["first_row"] = "first_row"


class BackboneConfig(Section):
    """Any backbone that yields a global image embedding."""

    # vit: this project's DINOv2 ViT (random init unless `path` is a checkpoint);
    # dinov2: an official DINOv2 state dict; timm: a timm model with local weights.
    kind: Literal["vit", "dinov2", "timm"] = "vit"
    arch: str = "vit_tiny"
    patch_size: int = Field(default=4, ge=1)
    path: Path | None = None
    image_size: int = Field(default=28, ge=8)
    grayscale: bool = False


class EmbedConfig(Section):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    batch_size: int = Field(default=256, ge=1)
    precision: Literal["bf16", "fp32"] = "bf16"


class RetrieveConfig(Section):
    n_neighbors: int = Field(default=4, ge=1)  # paper §3: N = 4
    index: Literal["auto", "flat", "ivfpq"] = "auto"
    # Cluster-based retrieval (paper §A.4): k-means on the pool (100,000 clusters at 1B scale); clusters holding
    # more than `min_queries` (3) query images contribute `images_per_cluster` (10,000) images, capped per dataset (1M).
    pool_clusters: int = Field(default=100_000, ge=1)
    min_queries: int = Field(default=3, ge=0)
    images_per_cluster: int = Field(default=10_000, ge=1)
    max_per_dataset: int = Field(default=1_000_000, ge=1)


class RebalanceConfig(Section):
    enabled: bool = True
    # Clusters per level, bottom-up; each level clusters the previous level's centroids.
    n_clusters: list[int] = Field(default_factory=lambda: [64, 8])
    # Size of the balanced selection; None keeps every retrieved image.
    target_size: int | None = Field(default=None, ge=1)
    n_iter: int = Field(default=20, ge=1)


class CorpusConfig(Section):
    shard_size: int = Field(default=1000, ge=1)
