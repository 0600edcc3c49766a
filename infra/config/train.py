"""DINOv2 pretraining. Sub-sections and key names follow dinov2's ssl_default_config.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from infra.config.base import Section


class StudentConfig(Section):
    arch: str = "vit_large"
    # 14: the paper and every released model (224 / 98 px crops = 16 / 7 patches); the reference code's
    # ssl_default_config has 16 (with 96 px local crops, its vitl16_short recipe).
    patch_size: int = Field(default=14, ge=1)
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
    # Initial scale of the position embeddings (reference: 0.02, small against the patch tokens' ~1 per dimension, so
    # a freshly built ViT sees its patches nearly as a bag; the CPU demo's short run learns faster at 1.0).
    pos_embed_init_std: float = Field(default=0.02, gt=0.0)
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
    # 98 = 7 patches of 14: the paper and the reference's vitl14 / vitg14 recipes. The reference code's
    # ssl_default_config has 96 (with patch 16).
    local_crops_size: int = Field(default=98, ge=4)
    # reference: the released code's effective blur probabilities (0.0 / 0.9 / 0.5, dinov2 PR #411);
    # paper: the intended 1.0 / 0.1 / 0.5.
    blur_mode: Literal["reference", "paper", "none"] = "reference"
    # Not configurable in the reference (these are its values); digits and other non-photographic data may need
    # less: solarisation of global view 2 and the horizontal flip of every view.
    solarize_p: float = Field(default=0.2, ge=0.0, le=1.0)
    hflip_p: float = Field(default=0.5, ge=0.0, le=1.0)
    # batched: geometric crops per image (PIL), photometric ops on the stacked batch (fast on CPU);
    # pil: every transform per image with torchvision, as the reference.
    augment_impl: Literal["batched", "pil"] = "batched"


class CollapseGuardConfig(Section):
    """Acts on the teacher's prototype usage entropy (`proto_entropy`, nats: log K when the batch's mean target
    uses the K prototypes uniformly, 0 when every target is the same prototype). Off by default: at
    initialisation, before centering has built up, a healthy run can start low (0.69 for the tiny test model)."""

    min_proto_entropy: float | None = Field(default=None, ge=0.0)  # e.g. 1.0: fewer than ~e prototypes in use
    action: Literal["warn", "stop"] = "warn"  # stop: raise TeacherCollapseError naming the value
    start_step: int = Field(default=0, ge=0)  # checked from this step on


# Keys a follow-up stage's `overrides` may not set: the stage itself decides them.
# How a training run executes, not what it learns: outside the training stages' keys, and changeable by `lvd resume`.
# Processes x accumulate_grad_batches sets the global batch; a change of it is refused when training resumes.
EXECUTION_KEYS = ("devices", "num_nodes", "accumulate_grad_batches", "num_workers", "cpu_threads", "log_every",
                  "checkpoint_every", "activation_checkpointing", "exports")
_STAGE_OWNED = ("mode", "teacher_weights", "enabled", "highres", "distill")


class HighresStageConfig(Section):
    """The optional `pretrain_highres` pipeline stage (paper §4 and B.2): the pretrain stage's teacher bundle
    (backbone and heads) continued at a higher resolution for `max_steps` iterations, every schedule compressed
    into them (`train.mode=highres`). Everything else is the pretrain stage's `train` section."""

    enabled: bool = False
    global_crops_size: int = Field(default=518, ge=8)  # paper: 518 (37 x 37 patches of 14); §6.6 ablation: 416
    local_crops_size: int | None = Field(default=None, ge=4)  # None: the pretrain value (the paper does not say)
    max_steps: int = Field(default=10_000, ge=1)  # paper: 10k iterations
    # Any other `train` key for this stage, nested as in the section; e.g. {optim: {base_lr: ...}} (the paper
    # lowers the lr without giving the value) or {batch_size_per_gpu: ...} for memory at 518 px.
    overrides: dict[str, Any] = Field(default_factory=dict)


class DistillStageConfig(Section):
    """The optional `distill` pipeline stage (paper §5): a smaller student trained from the frozen teacher bundle of
    the previous training stage (`train.mode=distill`: no masking, no drop path, iBOT on every patch of both
    global crops); the EMA of the student is its export. The student is `arch` with the teacher's patch size and
    the default architectural options (the paper's students use an MLP FFN); the rest of the stage is the pretrain
    stage's `train` section (its crops and schedule)."""

    enabled: bool = False
    arch: str = "vit_small"  # paper: ViT-S/14, B/14 and L/14 distilled from ViT-g/14
    # Any other `train` key, nested as in the section; e.g. {student: {num_register_tokens: 4}} or the paper's
    # {optim: {base_lr: 7.1e-4}, batch_size_per_gpu: 8} (lr 1e-3 at batch 2048 under sqrt_wrt_1024).
    overrides: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Section):
    enabled: bool = True
    # pretrain: SSL from scratch (or from student.pretrained_weights); highres: finishing stage from
    # student.pretrained_weights with every schedule compressed into max_steps (paper §4: 10k iterations at 518 px);
    # distill: a frozen teacher from teacher_weights replaces the EMA teacher, no masking, no drop path, iBOT on all
    # patches of both global crops, and an EMA of the student is kept and exported (paper §5).
    mode: Literal["pretrain", "highres", "distill"] = "pretrain"
    teacher_weights: Path | None = None
    student: StudentConfig = Field(default_factory=StudentConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    dino: DinoConfig = Field(default_factory=DinoConfig)
    ibot: IbotConfig = Field(default_factory=IbotConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    crops: CropsConfig = Field(default_factory=CropsConfig)
    batch_size_per_gpu: int = Field(default=64, ge=1)
    # Micro-batches of batch_size_per_gpu per optimiser step and process (gradients summed, averaged): the global batch
    # (the lr's square-root scaling, the schedules) is batch_size_per_gpu x processes x this. The teacher's targets
    # (centering or Sinkhorn-Knopp) and KoLeo are computed per micro-batch, over all processes; DDP all-reduces the
    # gradients once per step. Not in the reference. It may change at resume only with the number of processes, so that
    # the global batch stays the same (8 GPUs -> 4 GPUs x 2): the same images per step, the same schedules.
    accumulate_grad_batches: int = Field(default=1, ge=1)
    official_epoch_length: int = Field(default=1250, ge=1)
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    # Stop after this many iterations (None: epochs x official_epoch_length).
    max_steps: int | None = Field(default=None, ge=1)
    num_workers: int = Field(default=2, ge=0)
    # Global and local crops through the student backbone in one packed forward (block-diagonal attention).
    sequence_packing: bool = True
    # Lightning system settings.
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = Field(default=1, ge=1)
    # auto: FSDP on several GPUs (and to resume a sharded checkpoint), DDP on several CPU processes, else one process.
    # fsdp also runs on CPU processes (gloo): the GPU path without a GPU (tests, a sharded checkpoint on a CPU host).
    strategy: Literal["auto", "fsdp", "ddp"] = "auto"
    # auto: bf16 autocast on CUDA GPUs that support it; on a CPU with AMX or AVX512-BF16, bf16 when a probe product
    # measures bf16 at least 1.3x faster than fp32 (infra/precision.py, ~0.1 s once per process); else fp32
    # (emulated bf16 matmuls are slower than fp32). The choice is printed and kept with the run (docs/training.md).
    precision: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    # FSDP sharding (PyTorch's names): SHARD_GRAD_OP (the reference's), FULL_SHARD (also parameters between
    # forward and backward: least memory), HYBRID_SHARD (FULL_SHARD within a node, replicated across nodes: all-gathers
    # stay on the node's fast links; a node is `devices` processes, and with one device per node it replicates like
    # NO_SHARD), NO_SHARD (DDP-like).
    fsdp_sharding: Literal["SHARD_GRAD_OP", "FULL_SHARD", "HYBRID_SHARD", "NO_SHARD"] = "SHARD_GRAD_OP"
    # Recompute each student block's activations in the backward pass instead of keeping them: activation memory of
    # one block instead of all, for about one more forward of the blocks. Gradients are unchanged (tested), drop-path
    # samples included. Any strategy (DDP, FSDP, one process).
    activation_checkpointing: bool = False
    # torch intra-op threads per process on CPU (None: leave torch's default).
    cpu_threads: int | None = Field(default=None, ge=1)
    checkpoint_every: int = Field(default=3750, ge=1)
    log_every: int = Field(default=10, ge=1)
    # The reference's evaluation.eval_period_iterations (12500): every this many iterations, the teacher is exported
    # to eval/training_<iteration>/ (iteration 0-based, as the reference names them) for evaluating the learning
    # curve (`lvd evaluate ... --model NAME=<that folder>/teacher_backbone.safetensors`). None: only at the end.
    eval_period_iterations: int | None = Field(default=None, ge=1)
    collapse_guard: CollapseGuardConfig = Field(default_factory=CollapseGuardConfig)
    # Formats a pipeline training stage writes beside its safetensors and official .pth exports, each with a model card:
    # hf (<stage>/hf/: transformers' AutoModel.from_pretrained), timm (<stage>/timm/model.safetensors), onnx
    # (<stage>/onnx/model.onnx: a graph at the training resolution for onnxruntime, TensorRT, Triton). Not part of what
    # the stage learns: a change applies to stages trained from then on; `lvd export` writes any format of a finished run.
    exports: list[Literal["hf", "timm", "onnx"]] = Field(default_factory=lambda: ["hf"])
    # Optional pipeline stages after `pretrain` (flows/stages.py), each continuing from the previous one's bundle.
    highres: HighresStageConfig = Field(default_factory=HighresStageConfig)
    distill: DistillStageConfig = Field(default_factory=DistillStageConfig)

    def highres_stage(self, weights: Path) -> TrainConfig:
        """The `train` configuration of the `pretrain_highres` stage, initialised from the bundle `weights`."""
        h = self.highres
        crops: dict[str, Any] = {"global_crops_size": h.global_crops_size}
        if h.local_crops_size is not None:
            crops["local_crops_size"] = h.local_crops_size
        return self._follow_up(h.overrides, {"mode": "highres", "max_steps": h.max_steps, "crops": crops,
                                             "student": {"pretrained_weights": str(weights)}})

    def distill_stage(self, teacher: Path) -> TrainConfig:
        """The `train` configuration of the `distill` stage, with the frozen teacher bundle `teacher`."""
        student = {"arch": self.distill.arch, "patch_size": self.student.patch_size, "drop_path_rate": 0.0}
        cfg = self._follow_up(self.distill.overrides, {"mode": "distill", "teacher_weights": str(teacher)}, student)
        if cfg.student.patch_size != self.student.patch_size:  # iBOT compares student and teacher patch by patch
            raise ValueError(f"the student's patch size must be the teacher's ({self.student.patch_size})")
        return cfg

    def _follow_up(self, overrides: dict[str, Any], changes: dict[str, Any],
                   student: dict[str, Any] | None = None) -> TrainConfig:
        """This section without the follow-up sections (a stage never chains further), with `student` replacing the
        student section when given, then `overrides`, then the stage's own `changes`."""
        from infra.config.schema import deep_merge

        owned = sorted(set(overrides) & set(_STAGE_OWNED))
        if owned:
            raise ValueError(f"overrides may not set {owned} (the stage sets them)")
        tree = self.model_dump(mode="json", exclude={"highres", "distill"})
        if student is not None:
            tree["student"] = student
        return TrainConfig.model_validate(deep_merge(deep_merge(tree, overrides), changes))

    def _follow_up_problems(self) -> list[str]:
        problems = []
        for name, build in (("highres", self.highres_stage), ("distill", self.distill_stage)):
            if not getattr(self, name).enabled:
                continue
            try:
                build(Path("teacher_checkpoint.safetensors"))  # a placeholder: only the configuration is checked
            except ValidationError as err:
                for e in err.errors():
                    loc, msg = ".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, ")
                    problems.append(f"{name}: {loc}: {msg}" if loc else f"{name}: {msg}")
            except ValueError as err:
                problems.append(f"{name}: {err}")
        return problems

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        problems = self._follow_up_problems()
        patch = self.student.patch_size
        for key, size in (("global_crops_size", self.crops.global_crops_size),
                          ("local_crops_size", self.crops.local_crops_size)):
            if size % patch:
                problems.append(f"crops.{key}={size} is not a multiple of student.patch_size={patch}")
        if self.mode == "distill" and self.teacher_weights is None:
            problems.append("mode=distill needs train.teacher_weights (an exported teacher_checkpoint.safetensors)")
        if self.mode == "highres" and (self.student.pretrained_weights is None or self.max_steps is None):
            problems.append("mode=highres needs train.student.pretrained_weights and train.max_steps")
        if self.ibot.mask_ratio_min_max[0] > self.ibot.mask_ratio_min_max[1]:
            problems.append("ibot.mask_ratio_min_max must be increasing")
        if problems:
            raise ValueError("; ".join(problems))
        return self
