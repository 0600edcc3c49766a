"""Frozen-feature evaluation (dinov2 ``eval/`` protocols) and the run report.

Classification benchmarks are the ``data.eval_sets`` (also used by relative dedup) plus any ``classification``
entry of ``evaluate.benchmarks``; the other benchmark kinds are declared only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from infra.config.base import Section
from infra.config.curation import BackboneConfig
from infra.config.data import DatasetFormat

ClassificationProtocol = Literal["knn", "linear", "logreg"]


class KnnConfig(Section):
    ks: list[int] = Field(default_factory=lambda: [10, 20, 100, 200])  # dinov2 eval/knn.py nb_knn
    temperature: float = Field(default=0.07, gt=0)


class LinearConfig(Section):
    """dinov2 ``eval/linear.py``: every (n last blocks, avgpool, lr) classifier trained jointly, best on val."""

    n_last_blocks: list[int] = Field(default_factory=lambda: [1, 4])
    avgpool: list[bool] = Field(default_factory=lambda: [False, True])
    # code: the released code's grid {1e-5 ... 0.1}; paper: §B.3's {1e-4 ... 0.5} (reference §6 pitfall 5);
    # or an explicit list. Each lr is scaled by batch_size / 256.
    lr_grid: Literal["code", "paper"] | list[float] = "code"
    batch_size: int = Field(default=128, ge=1)  # per GPU in the reference (one process here)
    iterations: int = Field(default=12_500, ge=1)  # 10 epochs x 1250 (paper §B.3)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    # Fraction of train held out for selection when the eval set has no val split (seed 0).
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)


class LogRegConfig(Section):
    """dinov2 ``eval/log_regression.py``: L-BFGS, L2, C = 10^linspace(-6, 5, 45) chosen on 10% of train, refit."""

    c_min_exp: float = -6.0
    c_max_exp: float = 5.0
    n_c: int = Field(default=45, ge=1)
    max_iter: int = Field(default=1000, ge=1)
    tol: float = Field(default=1e-12, gt=0)
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)


class DenseConfig(Section):
    """Linear segmentation probe (paper §7.4 "linear"): one linear layer on last-layer patch tokens; the optimiser
    of the reference's ``*_linear_config.py`` (AdamW, poly decay, 40k iterations of batch 16)."""

    iterations: int = Field(default=40_000, ge=1)  # the reference's 40k; short-budget overlays set fewer
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)


class CopyDetectionConfig(Section):
    k: int = Field(default=10, ge=1)  # candidates per query (sscd disc_eval)
    max_distractors: int = Field(default=500, ge=0)  # queries without a copy, in the demo truth format


class ClassificationBenchmark(Section):
    kind: Literal["classification"] = "classification"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    train: Path
    test: Path
    val: Path | None = None
    format: DatasetFormat = "auto"
    protocols: list[ClassificationProtocol] | None = None  # None: evaluate.protocols


class RetrievalBenchmark(Section):
    """Revisited Oxford/Paris: ``images`` holds ``<name>.jpg`` for every ``imlist``/``qimlist`` entry of ``gnd``."""

    kind: Literal["retrieval"] = "retrieval"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    images: Path
    gnd: Path  # gnd_<name>.pkl (revisitop) or the same structure as JSON
    extension: str = ".jpg"
    crop_queries: bool = True  # the revisited protocol crops queries to their bounding box


class CopyDetectionBenchmark(Section):
    """Queries, references and ground-truth pairs (query, reference) as image paths; micro-AP over all pairs."""

    kind: Literal["copy_detection"] = "copy_detection"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # A parquet/CSV table with `query` and `reference` (empty: a distractor query) paths, relative to its folder;
    # or the demo crawl's truth.parquet (eval_copy rows are copies, digit rows distractors).
    ground_truth: Path
    references: Path  # the reference images (any dataset format); matched to ground truth by content hash
    format: DatasetFormat = "auto"


class SegmentationBenchmark(Section):
    """``<root>/images/<split>/<stem>.<ext>`` and ``<root>/annotations/<split>/<stem>.png`` (class ids, 255 ignored)."""

    kind: Literal["segmentation"] = "segmentation"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    root: Path
    train_split: str = "train"
    test_split: str = "test"
    n_classes: int | None = Field(default=None, ge=1)  # None: from the labels (or classes.txt)
    # ADE20k convention (mmseg reduce_zero_label): label 0 is "other" and ignored, classes 1..K become 0..K-1.
    reduce_zero_label: bool = False


Benchmark = Annotated[
    ClassificationBenchmark | RetrievalBenchmark | CopyDetectionBenchmark | SegmentationBenchmark,
    Field(discriminator="kind"),
]


class ModelEntry(Section):
    """A model evaluated side by side with the run's own (e.g. an official DINOv2 checkpoint)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    backbone: BackboneConfig


class EvaluateConfig(Section):
    enabled: bool = True
    protocols: list[ClassificationProtocol] = Field(default_factory=lambda: ["knn", "linear", "logreg"])
    knn: KnnConfig = Field(default_factory=KnnConfig)
    linear: LinearConfig = Field(default_factory=LinearConfig)
    logreg: LogRegConfig = Field(default_factory=LogRegConfig)
    dense: DenseConfig = Field(default_factory=DenseConfig)
    copy_detection: CopyDetectionConfig = Field(default_factory=CopyDetectionConfig)
    benchmarks: list[Benchmark] = Field(default_factory=list)
    # Reference checkpoints evaluated beside the pretrained model (same benchmarks, same protocols).
    models: list[ModelEntry] = Field(default_factory=list)
    batch_size: int = Field(default=256, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where native (infra.precision)
    # Also evaluate the same architecture at random initialisation, and raw pixels, as baselines.
    random_init_baseline: bool = True
    raw_pixel_baseline: bool = True
    # Extracted features, keyed by model fingerprint + dataset digest + transform; None: <run root>/.cache/features.
    cache_dir: Path | None = None
    # Write the HTML run report at the end of the flow.
    report: bool = True
