"""Per-iteration schedules (reference `CosineScheduler`, `train.py: build_schedulers`) and derived values.

`CosineScheduler`: optional zeros (freeze), a linear warmup (`np.linspace(start, base, warmup)`, so the last
warmup iteration is exactly `base`), then a half-cosine from base towards final over the remaining iterations;
at or past `total_iters` it returns `final`.

| schedule        | shape                                                                    |
|-----------------|--------------------------------------------------------------------------|
| lr              | 0 -> lr over warmup_epochs, cosine to min_lr                             |
| last-layer lr   | lr, forced to 0 for the first freeze_last_layer_epochs                    |
| weight decay    | cosine weight_decay -> weight_decay_end (it increases), no warmup         |
| teacher momentum| cosine momentum_teacher -> final_momentum_teacher (1.0)                   |
| teacher temp    | linear warmup_teacher_temp -> teacher_temp over warmup_teacher_temp_epochs, then constant |
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from infra.config.train import TrainConfig


@dataclass(frozen=True)
class CosineScheduler:
    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    freeze_iters: int = 0

    def __post_init__(self) -> None:
        assert self.freeze_iters + self.warmup_iters <= self.total_iters, "warmup/freeze longer than the schedule"

    def __getitem__(self, it: int) -> float:
        if it >= self.total_iters:
            return self.final_value
        if it < self.freeze_iters:
            return 0.0
        it -= self.freeze_iters
        if it < self.warmup_iters:
            if self.warmup_iters == 1:
                return self.start_warmup_value
            return self.start_warmup_value + (self.base_value - self.start_warmup_value) * it / (self.warmup_iters - 1)
        it -= self.warmup_iters
        n = self.total_iters - self.warmup_iters - self.freeze_iters
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (1 + math.cos(math.pi * it / n))


@dataclass(frozen=True)
class Derived:
    """Values computed from the config and the world size; logged at the start of a run."""

    world_size: int
    global_batch: int
    lr: float  # base_lr after the scaling rule
    iters_per_epoch: float
    total_iters: int  # schedule length
    run_iters: int  # iterations this run trains for
    warmup_iters: int
    freeze_last_layer_iters: int
    teacher_temp_warmup_iters: int
    global_patches: int  # patch tokens per global crop
    local_patches: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024)
    if rule == "linear_wrt_256":
        return base_lr * global_batch / 256
    return base_lr


def derive(cfg: TrainConfig, world_size: int) -> Derived:
    """The one place where derived values come from.

    In `highres` mode every epoch-based length is compressed into `max_steps` (an "epoch" becomes
    max_steps / optim.epochs iterations), i.e. the whole schedule shape is replayed over the finishing stage.
    """
    global_batch = cfg.batch_size_per_gpu * world_size * cfg.accumulate_grad_batches
    if cfg.mode == "highres":
        assert cfg.max_steps is not None, "highres mode needs train.max_steps"
        per_epoch = cfg.max_steps / cfg.optim.epochs
    else:
        per_epoch = float(cfg.official_epoch_length)
    total = round(cfg.optim.epochs * per_epoch)
    patch = cfg.student.patch_size
    return Derived(
        world_size=world_size, global_batch=global_batch,
        lr=scaled_lr(cfg.optim.base_lr, global_batch, cfg.optim.scaling_rule), iters_per_epoch=per_epoch,
        total_iters=total, run_iters=min(cfg.max_steps, total) if cfg.max_steps else total,
        warmup_iters=min(int(cfg.optim.warmup_epochs * per_epoch), total),
        freeze_last_layer_iters=min(int(cfg.optim.freeze_last_layer_epochs * per_epoch), total),
        teacher_temp_warmup_iters=int(cfg.teacher.warmup_teacher_temp_epochs * per_epoch),
        global_patches=(cfg.crops.global_crops_size // patch) ** 2,
        local_patches=(cfg.crops.local_crops_size // patch) ** 2,
    )


@dataclass(frozen=True)
class StepValues:
    lr: float
    last_layer_lr: float
    wd: float
    momentum: float
    teacher_temp: float


class Schedules:
    def __init__(self, cfg: TrainConfig, d: Derived):
        self.lr = CosineScheduler(d.lr, cfg.optim.min_lr, d.total_iters, warmup_iters=d.warmup_iters)
        self.wd = CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, d.total_iters)
        self.momentum = CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher,
                                        d.total_iters)
        self.teacher_temp = CosineScheduler(cfg.teacher.teacher_temp, cfg.teacher.teacher_temp,
                                            d.teacher_temp_warmup_iters, warmup_iters=d.teacher_temp_warmup_iters,
                                            start_warmup_value=cfg.teacher.warmup_teacher_temp)
        self.freeze_last_layer_iters = d.freeze_last_layer_iters

    def at(self, it: int) -> StepValues:
        lr = self.lr[it]
        return StepValues(lr=lr, last_layer_lr=0.0 if it < self.freeze_last_layer_iters else lr, wd=self.wd[it],
                          momentum=self.momentum[it], teacher_temp=self.teacher_temp[it])
