"""Curation: dedup (paper §A.3), embedding, retrieval (§3, §A.4), rebalancing (Vo et al. 2024), corpus.

Defaults are the paper's values where the paper gives one (cited next to the field); the demo overlay
(`configs/demo.yaml`) holds only the differences needed on a 3,000-image CPU crawl.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from infra.config.base import Section, Width
from infra.hub import hub_snapshot


class IndexConfig(Section):
    """A FAISS index for kNN search, chosen by scale (paper §3: GPU IVF-PQ at 1B scale).

    ``auto``: exact ``flat`` search up to ``flat_max`` vectors, IVF beyond. Similarities that leave an index are
    always recomputed exactly from the stored vectors, so thresholds never see PQ-approximate scores.
    ``ivf_blocks``: the IVF partition searched list by list as dense matmuls (all queries probing a list at once),
    base vectors stored by list on disk; exact scores, candidates limited to the probed lists; for threshold graphs
    (dedup: every pair above the threshold) and kNN (retrieval: a running top-k, re-scored exactly).
    Scaling: by default nlist ~ 4 sqrt(n); ``list_size`` fixes the list size instead (nlist = n / list_size: the scan
    per query does not grow with n), a fixed ``nlist`` with a fixed ``nprobe`` scans a fixed share of the pool per
    query (docs/scaling.md).
    """

    kind: Literal["auto", "flat", "ivf_flat", "ivfpq", "ivf_blocks"] = "auto"
    flat_max: int = Field(default=200_000, ge=1)
    large: Literal["ivf_flat", "ivfpq", "ivf_blocks"] = "ivfpq"  # what `auto` picks above `flat_max`
    nlist: int | None = Field(default=None, ge=1)  # None: n / list_size, or 4 * sqrt(n) rounded to a power of two
    list_size: int | None = Field(default=None, ge=1)  # target vectors per list when nlist is None
    nprobe: int = Field(default=16, ge=1)
    # nprobe tied to nlist: ceil(probe_share x nlist) lists probed (overrides nprobe), so the share of the pool
    # scanned per query, and with it recall, does not change as nlist grows with the pool. None: nprobe.
    probe_share: float | None = Field(default=None, gt=0.0, le=1.0)
    # ivf_blocks: a second pass over the `nprobe_wide` best lists, only for queries that found a pair above the
    # threshold in the first pass (copies are rare: most vectors need no second look). 0: no second pass.
    nprobe_wide: int = Field(default=0, ge=0)
    # ivf_blocks coarse quantizer over centroids trained by two-level k-means (FAISS k-means): flat (FAISS
    # IndexFlatIP, every centroid scored; fastest measured up to a few thousand lists), ivf (the centroids' own
    # k-means groups, `quantizer_nprobe` of them scored) or hnsw (FAISS IndexHNSWFlat). The FAISS kinds (ivf_flat,
    # ivfpq) always use FAISS's flat quantizer.
    quantizer: Literal["flat", "ivf", "hnsw"] = "flat"
    quantizer_nprobe: int = Field(default=16, ge=1)
    hnsw_m: int = Field(default=32, ge=4)
    hnsw_ef: int = Field(default=64, ge=1)
    # ivf_blocks: split cells holding more than twice the mean share of the training sample (k-means cells on
    # power-law data are very unequal, and queries land in the large ones more often).
    balance: bool = True
    # ivf_blocks scans: bf16 matmuls (every pair within the bf16 error bound of a threshold re-scored in fp32, so a
    # threshold graph equals the fp32 scan's; kNN candidates re-scored exactly) or fp32; auto: bf16 where the CPU
    # has native bf16 (infra.precision), fp32 elsewhere (emulated bf16 is slower than fp32).
    scan_precision: Literal["auto", "fp32", "bf16"] = "auto"
    pq_m: int = Field(default=32, ge=1)  # sub-quantizers; must divide the dimension
    pq_nbits: int = Field(default=8, ge=1, le=16)
    # Candidates per query taken from the index before exact re-ranking (x the k asked for).
    refine_factor: int = Field(default=4, ge=1)
    train_size: int = Field(default=262_144, ge=1)  # vectors sampled to train the coarse quantizer and PQ
    use_gpu: Literal["auto", "never"] = "auto"  # auto: FAISS GPU when the build and a device are present
    # Queries whose approximate results are checked against exact search (recall in the stage manifest).
    recall_sample: int = Field(default=1000, ge=0)


class DescriptorConfig(Section):
    """The copy-detection descriptor used for near-duplicate detection (paper §A.3: SSCD, Pizzi et al. 2022)."""

    # sscd: the SSCD model (ResNet-50 + GeM p=3 + 512-d projection + L2) from a local file;
    # pixel: a training-free grey-pixel descriptor (offline demo; calibrate its thresholds).
    backend: Literal["sscd", "pixel"] = "sscd"
    path: Path | None = None  # *.torchscript.pt | *.torchvision.pt (state dict) | *.onnx
    format: Literal["auto", "torchscript", "torchvision", "onnx"] = "auto"
    # ONNX files: the input layout. auto reads it from the model's input signature (element type, channel position);
    # name it where the signature is ambiguous. float_*: ImageNet-normalised float32 (this project's export_onnx);
    # uint8_*: RGB 0-255 with the normalisation inside the graph (e.g. the published int8 sscd_disc_mixup export).
    input: Literal["auto", "float_nchw", "float_nhwc", "uint8_nchw", "uint8_nhwc"] = "auto"
    # Intra-op threads of the model (onnxruntime's session; torch's process-wide count for the other formats);
    # 0: one per core.
    threads: int = Field(default=0, ge=0)
    arch: Literal["resnet50", "resnet18", "resnext101_32x8d"] = "resnet50"  # trunk of torchvision state dicts
    dims: int = Field(default=512, ge=1)
    # SSCD preprocessing: squash to size x size (320, batched) or short side to size (288, aspect kept).
    resize: Literal["square", "short_side"] = "square"
    # None: 320 (square) / 288 (short_side) for sscd; 16 for pixel.
    image_size: int | None = Field(default=None, ge=4)
    batch_size: int = Field(default=64, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where native (infra.precision)
    # Query views: centre crops at these fractions of each side, each also mirrored when `flip`. The index holds
    # one descriptor per image (fraction 1.0); a copy cropped by ~7% per side is found from its original's 0.86
    # view. [1.0] is plain SSCD retrieval.
    views: list[float] = Field(default_factory=lambda: [1.0])
    flip: bool = False
    # Descriptor post-processing (SSCD README / disc_eval.py): centring or PCA-whitening (+ L2), fitted on a
    # sample of the pool; optional output dimension for PCA-whitening.
    whitening: Literal["none", "center", "pcaw"] = "none"
    whitening_dim: int | None = Field(default=None, ge=1)
    whitening_sample: int = Field(default=100_000, ge=2)

    @model_validator(mode="after")
    def _check(self) -> DescriptorConfig:
        if not self.views or any(not 0.1 <= v <= 1.0 for v in self.views):
            raise ValueError("views: centre-crop fractions in [0.1, 1.0], at least one")
        return self

    @property
    def size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        if self.backend == "pixel":
            return 16
        return 320 if self.resize == "square" else 288


class ScoreNormConfig(Section):
    """SSCD score normalisation (disc_eval.py `--score_norm 1.0[0,2]`): subtract beta x the mean similarity of a
    query to its 1st..3rd nearest neighbours in a background set. Off by default; thresholds then apply to the
    normalised score."""

    enabled: bool = False
    beta: float = 1.0
    ranks: tuple[int, int] = (0, 2)  # inclusive 0-based neighbour ranks averaged
    # Background images: a dataset path, or None for a random sample of this many pool images.
    background: Path | None = None
    background_size: int = Field(default=10_000, ge=4)


class DedupConfig(Section):
    # false: nothing is described or searched; every image passes (its own component) with an `info dedup_disabled`
    # ledger event. The paper's curation always deduplicates; for pools known to be duplicate-free.
    enabled: bool = True
    descriptor: DescriptorConfig = Field(default_factory=DescriptorConfig)
    score_norm: ScoreNormConfig = Field(default_factory=ScoreNormConfig)
    # Above flat_max: ivf_blocks with lists of a fixed size (the scan per vector does not grow with the pool), 8 lists
    # probed per vector and 64 for the few with an edge after that (docs/curation.md, docs/scaling.md); its edge
    # recall against brute force is measured and recorded (extra.recall).
    index: IndexConfig = Field(default_factory=lambda: IndexConfig(kind="auto", large="ivf_blocks", list_size=512, nprobe=8,
                                                                   nprobe_wide=64))  # fmt: skip
    k: int = Field(default=64, ge=1)  # paper §A.3: 64 neighbours
    threshold: float = Field(default=0.6, ge=-1.0, le=1.0)  # paper §A.3: cosine > 0.6
    eval_threshold: float = Field(default=0.45, ge=-1.0, le=1.0)  # paper §A.3: cosine > 0.45
    # The member of a component that is kept: first_row = smallest row_id (first seen in the crawl);
    # largest = most pixels, ties to the smallest row_id. Both deterministic.
    representative: Literal["first_row", "largest"] = "first_row"


class BackboneConfig(Section):
    """Any backbone that yields a global image embedding."""

    # vit: this project's DINOv2 ViT (random init unless `path` is a checkpoint);
    # dinov2: a DINOv2 checkpoint, `path` required: official (dinov2_vit*14*_pretrain.pth, a training run's
    # teacher_checkpoint.pth, block chunks or not), a transformers folder, or a timm DINOv2 state dict;
    # dinov3: a DINOv3 checkpoint, `path` required: Meta's release (dinov3_vits16_pretrain_lvd1689m-*.pth), a
    # transformers DINOv3ViTModel folder or timm's vit_*_patch16_dinov3 weights (curation.models.dinov3; its class
    # token is the embedding); timm: a timm architecture with a local weights file (.safetensors / .pth state dict).
    kind: Literal["vit", "dinov2", "dinov3", "timm"] = "vit"
    arch: str = "vit_tiny"
    patch_size: int = Field(default=4, ge=1)
    path: Path | None = None
    image_size: int = Field(default=28, ge=8)
    # How a DINOv2 backbone resizes its position embeddings to another resolution (dinov2's interpolate_offset and
    # interpolate_antialias). None keeps the checkpoint's own: what a project export records; for an official
    # checkpoint the hub's convention (0.1 / false without registers, 0 / true with); for a transformers folder or a
    # timm file, what that library computes. Official register models trained with the SSL defaults need 0.1 / false.
    interpolate_offset: float | None = Field(default=None, ge=0)
    interpolate_antialias: bool | None = None

    @property
    def label(self) -> str:
        """`vit:vit_tiny`, `timm:vit_small_patch14_dinov2`; a DINOv3 by its file or folder (a hub cache's by its
        repository folder): `dinov3:dinov3_vits16_pretrain_lvd1689m-08c60483.pth`."""
        if self.kind != "dinov3" or self.path is None:
            return f"{self.kind}:{self.arch}"
        path = Path(self.path)
        return f"dinov3:{path.parent.parent.name if path.parent.name == 'snapshots' else path.name}"

    @field_validator("path")
    @classmethod
    def _snapshot(cls, path: Path | None) -> Path | None:
        return None if path is None else hub_snapshot(path)  # a Hugging Face cache folder: its snapshot

    @model_validator(mode="after")
    def _check(self) -> BackboneConfig:
        if self.kind == "dinov2" and self.path is None:
            raise ValueError("kind=dinov2 needs `path` (an official dinov2_*_pretrain.pth; `lvd models fetch`)")
        if self.kind == "dinov3" and self.path is None:
            raise ValueError("kind=dinov3 needs `path` (Meta's dinov3_*_pretrain_*.pth, a transformers DINOv3 folder, "
                             "or timm's vit_*_patch16_dinov3 weights)")  # fmt: skip
        if self.kind in ("timm", "dinov3") and (self.interpolate_offset is not None or
                                                 self.interpolate_antialias is not None):  # fmt: skip
            why = "RoPE: no position table to resize" if self.kind == "dinov3" else "timm resizes its own way"
            raise ValueError("interpolate_offset / interpolate_antialias apply to DINOv2 backbones (kind vit or "
                             f"dinov2), not to kind={self.kind} ({why})")
        return self


class EmbedConfig(Section):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    # Retrieval and rebalancing are only as good as this embedder (the paper: a self-supervised ViT-H/16). A run
    # whose backbone has no weights (kind=vit without `path`) is refused unless this says it is meant (the demo).
    allow_random_init: bool = False
    batch_size: int = Field(default=256, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # autocast dtype; auto: bf16 where native (infra.precision)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Images decoded and preprocessed in parallel per batch (between the model's batches). auto: the CPUs this
    # process may use (infra.cpus). It was 2: decoding a 256 px corpus JPEG to a 224 px tensor takes ~3 ms per
    # thread on the developers' EPYC, so two threads held a GPU's embedding to 510-600 images/s.
    decode_threads: Width = "auto"


class DatasetRetrieval(Section):
    """Per-dataset overrides of retrieval (paper Table 15: k=32 for ImageNet-1k, 4 elsewhere)."""

    n_neighbors: int | None = Field(default=None, ge=1)
    images_per_cluster: int | None = Field(default=None, ge=1)
    max_images: int | None = Field(default=None, ge=1)


class RetrieveConfig(Section):
    # seeds: retrieval around the curated seed sets (paper §3); pool: no retrieval, the whole deduplicated pool goes
    # to rebalancing (clustering-based balanced sampling, Vo et al. 2024); auto: seeds when a seed set retrieves
    # (`retrieval: sample | cluster`), else pool.
    mode: Literal["auto", "seeds", "pool"] = "auto"
    n_neighbors: int = Field(default=4, ge=1)  # paper §3: N = 4
    # Above flat_max: ivf_blocks with a fixed number of lists (they grow with the pool) and half of them probed: the
    # share of the pool scanned per query is fixed, so recall@N holds as the pool grows and, for a given set of seed
    # queries, the work grows linearly with it; candidates ranked in bf16 are re-scored exactly (docs/curation.md).
    index: IndexConfig = Field(default_factory=lambda: IndexConfig(kind="auto", large="ivf_blocks", nlist=512, probe_share=0.5,
                                                                   balance=False))  # fmt: skip
    # Cluster-based retrieval (paper §A.4): k-means on the pool (100,000 clusters at 1B scale); clusters holding
    # more than `min_queries` (3) query images contribute `images_per_cluster` (10,000) images, capped per dataset (1M).
    pool_clusters: int = Field(default=100_000, ge=1)
    min_queries: int = Field(default=3, ge=0)
    images_per_cluster: int = Field(default=10_000, ge=1)
    max_per_dataset: int = Field(default=1_000_000, ge=1)
    kmeans_iters: int = Field(default=20, ge=1)
    kmeans_sample: int = Field(default=1_000_000, ge=1)  # fit on a sample, assign every pool image
    # k-means++ (sequential in k: ~k x trials passes over its points) on at most this many of the fit sample
    # (None: all of it); at 100k clusters e.g. 10-20 points per cluster.
    kmeans_init_sample: int | None = Field(default=None, ge=1)
    # Overrides keyed by seed-set name.
    datasets: dict[str, DatasetRetrieval] = Field(default_factory=dict)


class RebalanceConfig(Section):
    """Hierarchical k-means with resampling, then balanced top-down sampling (Vo et al. 2024)."""

    enabled: bool = True
    # Clusters per level, bottom-up; level t > 1 clusters the centroids of level t-1.
    n_clusters: list[int] = Field(default_factory=lambda: [64, 8])
    # Per level: k-means runs (1 = no resampling) and points per cluster taken at each resampling step
    # (ssl-data-curation web config: steps 1,10,10,10; sizes 1,10,5,3, about half the mean cluster size).
    n_resampling_steps: list[int] | None = None  # None: 1 everywhere
    sample_sizes: list[int] | None = None  # None: 1 everywhere
    resample_strategy: Literal["closest", "random"] = "closest"
    n_iter: int = Field(default=20, ge=1)  # Lloyd iterations per k-means run (reference configs: 50)
    # Size of the balanced selection; None keeps every retrieved image.
    target_size: int | None = Field(default=None, ge=1)
    leaf_strategy: Literal["random", "closest"] = "random"  # reference: r (default) or c
    fit_sample: int = Field(default=1_000_000, ge=1)  # level 1 is fitted on at most this many points
    init_sample: int | None = Field(default=None, ge=1)  # k-means++ on at most this many of them (None: all)
    precision: Literal["bf16", "fp32"] = "fp32"  # dtype of the assignment matmul (sums are float64)

    @model_validator(mode="after")
    def _check(self) -> RebalanceConfig:
        for name in ("n_resampling_steps", "sample_sizes"):
            v = getattr(self, name)
            if v is not None and (len(v) != len(self.n_clusters) or min(v) < 1):
                raise ValueError(f"{name}: one positive value per level of n_clusters ({len(self.n_clusters)})")
        return self

    def steps(self, level: int) -> int:
        return 1 if self.n_resampling_steps is None else self.n_resampling_steps[level]

    def sample_size(self, level: int) -> int:
        return 1 if self.sample_sizes is None else self.sample_sizes[level]


class CorpusConfig(Section):
    shard_size: int = Field(default=1000, ge=1)
