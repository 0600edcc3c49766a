"""Lightning callbacks of a pretraining run: atomic resume checkpoints, metrics CSV, throughput, exports."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import lightning as L
import torch

from infra.storage import commit, fsync_dir
from training.checkpoint import export_backbone, export_bundle, load_official_state_dict
from training.distributed import barrier
from training.fsdp import full_state_dict
from training.layers import DINOHead
from training.metrics import MetricsWriter
from training.vision_transformer import DinoVisionTransformer


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace `final` with the complete `tmp`; the previous checkpoint stays until the new one is whole."""
    if tmp.is_file():
        commit(tmp, final)  # fsync + atomic rename
        return
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """`last.ckpt`, or the `.old` copy left by a crash between the two renames of a directory checkpoint."""
    for name in ("last.ckpt", "last.ckpt.old"):
        if (ckpt_dir / name).exists():
            return ckpt_dir / name
    return None


class AtomicCheckpoint(L.Callback):
    """Save `last.ckpt` every `every` steps, at `interrupt_at` (then stop), and at the end of training."""

    def __init__(self, ckpt_dir: Path, every: int, interrupt_at: int | None = None):
        self.path = Path(ckpt_dir) / "last.ckpt"
        self.every = every
        self.interrupt_at = interrupt_at
        self.saved_step = -1

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self.saved_step:
            return
        tmp = self.path.with_name(f".last.ckpt.tmp{trainer.global_step}")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        barrier()
        trainer.save_checkpoint(tmp, weights_only=False)  # the full resume state
        barrier()
        if trainer.is_global_zero:
            _swap_into_place(tmp, self.path)
        barrier()
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step  # steps completed
        if step == self.interrupt_at:
            trainer.should_stop = True
        if step % self.every == 0 or step == self.interrupt_at:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)


class MetricsLogger(L.Callback):
    """One CSV row per step (rank 0): loss terms, schedules, collapse monitor, grad norms, step time."""

    def __init__(self, out_dir: Path, flush_every: int):
        self.writer = MetricsWriter(out_dir)
        self.flush_every = flush_every
        self.last: dict[str, float] = {}
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.images = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.writer.truncate(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now  # throughput excludes the first step (start-up, allocations)
        else:
            self.images += pl_module.derived.global_batch
        self.t_last = now
        self.last = dict(pl_module.last_record)
        if trainer.is_global_zero:
            self.writer.log(self.last)
            if trainer.global_step % self.flush_every == 0:
                self.writer.flush()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            self.writer.consolidate()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.writer.consolidate()

    @property
    def images_per_second(self) -> float:
        if self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            return 0.0
        return self.images / (self.t_last - self.t_first)


class ExportTeacher(L.Callback):
    """At the end of training: the exported model's backbone in the official format (safetensors + .pth) and the
    backbone + heads bundle (`teacher_checkpoint.safetensors`, usable as a distillation teacher or for highres)."""

    def __init__(self, out_dir: Path):
        self.backbone_path = Path(out_dir) / "teacher_backbone.safetensors"
        self.bundle_path = Path(out_dir) / "teacher_checkpoint.safetensors"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        modules = pl_module.meta.export_modules()
        template = pl_module.meta.student
        plain = {}
        for name in modules:  # gather (FSDP) into fresh CPU modules of the same structure
            state = full_state_dict(modules[name])
            if trainer.is_global_zero:
                plain[name] = _fresh_copy(template[name], state)
        if trainer.is_global_zero:
            export_backbone(plain["backbone"], self.backbone_path)
            export_bundle(plain, self.bundle_path)
        barrier()


def _fresh_copy(like: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU module like `like` (possibly FSDP-wrapped or chunked) holding `state`."""
    inner = getattr(like, "module", like)
    if isinstance(inner, DinoVisionTransformer):
        fresh = DinoVisionTransformer(**inner.arch_kwargs)  # never chunked: exports use the flat layout
        load_official_state_dict(fresh, {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v
                                         for k, v in state.items()}, strict=True)
        return fresh
    fresh = DINOHead(**inner.head_kwargs)
    fresh.load_state_dict(state, strict=True)
    return fresh
