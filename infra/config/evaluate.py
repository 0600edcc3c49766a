"""Frozen-feature evaluation (dinov2 eval protocols)."""

from __future__ import annotations

from pydantic import Field

from infra.config.base import Section


class KnnConfig(Section):
    ks: list[int] = Field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = Field(default=0.07, gt=0)


class EvaluateConfig(Section):
    enabled: bool = True
    knn: KnnConfig = Field(default_factory=KnnConfig)
    batch_size: int = Field(default=256, ge=1)
    # Also evaluate the same architecture at random initialisation, and raw pixels, as baselines.
    random_init_baseline: bool = True
    raw_pixel_baseline: bool = True
