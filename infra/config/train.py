"""DINOv2 pretraining. Sub-sections and key names follow dinov2's ssl_default_config.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from infra.config.base import Section


class StudentConfig(Section):
    arch: str = "vit_large"
    patch_size: int = Field(default=16, ge=1)
    drop_path_rate: float = Field(default=0.3, ge=0.0, lt=1.0)
    drop_path_uniform: bool = True
    layerscale: float | None = 1.0e-5
    ffn_layer: Literal["mlp", "swiglu", "swiglufused", "identity"] = "mlp"
    block_chunks: int = Field(default=0, ge=0)
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = Field(default=0, ge=0)
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    # Initialise from a checkpoint (project, or official DINOv2 format).
    pretrained_weights: Path | None = None


class TeacherConfig(Section):
    momentum_teacher: float = Field(default=0.992, ge=0.0, le=1.0)
    final_momentum_teacher: float = Field(default=1.0, ge=0.0, le=1.0)
    warmup_teacher_temp: float = Field(default=0.04, gt=0.0)
    teacher_temp: float = Field(default=0.07, gt=0.0)
    warmup_teacher_temp_epochs: float = Field(default=30, ge=0)


class DinoConfig(Section):
    loss_weight: float = 1.0
    head_n_prototypes: int = Field(default=65536, ge=1)
    head_bottleneck_dim: int = Field(default=256, ge=1)
    head_nlayers: int = Field(default=3, ge=1)
    head_hidden_dim: int = Field(default=2048, ge=1)
    koleo_loss_weight: float = 0.1


class IbotConfig(Section):
    loss_weight: float = 1.0
    mask_sample_probability: float = Field(default=0.5, ge=0.0, le=1.0)
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    separate_head: bool = False
    head_n_prototypes: int = Field(default=65536, ge=1)
    head_bottleneck_dim: int = Field(default=256, ge=1)
    head_nlayers: int = Field(default=3, ge=1)
    head_hidden_dim: int = Field(default=2048, ge=1)


class OptimConfig(Section):
    epochs: float = Field(default=100, gt=0)
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    base_lr: float = Field(default=4.0e-3, gt=0)  # for a global batch of 1024
    warmup_epochs: float = Field(default=10, ge=0)
    min_lr: float = Field(default=1.0e-6, ge=0)
    clip_grad: float | None = 3.0
    freeze_last_layer_epochs: float = Field(default=1, ge=0)
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = "sqrt_wrt_1024"
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = Field(default=0.9, gt=0, le=1.0)
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


class CropsConfig(Section):
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = Field(default=8, ge=0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    global_crops_size: int = Field(default=224, ge=8)
    local_crops_size: int = Field(default=96, ge=4)
    # reference: the released code's effective blur probabilities (0.0 / 0.9 / 0.5, dinov2 PR #411);
    # paper: the intended 1.0 / 0.1 / 0.5.
    blur_mode: Literal["reference", "paper"] = "reference"


class TrainConfig(Section):
    enabled: bool = True
    student: StudentConfig = Field(default_factory=StudentConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    dino: DinoConfig = Field(default_factory=DinoConfig)
    ibot: IbotConfig = Field(default_factory=IbotConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    crops: CropsConfig = Field(default_factory=CropsConfig)
    batch_size_per_gpu: int = Field(default=64, ge=1)
    official_epoch_length: int = Field(default=1250, ge=1)
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    # Stop after this many iterations (None: epochs x official_epoch_length).
    max_steps: int | None = Field(default=None, ge=1)
    num_workers: int = Field(default=2, ge=0)
    # Lightning system settings.
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = Field(default=1, ge=1)
    strategy: Literal["auto", "fsdp", "ddp"] = "auto"
    precision: Literal["bf16", "fp32", "fp16"] = "bf16"
    checkpoint_every: int = Field(default=3750, ge=1)
    log_every: int = Field(default=10, ge=1)
