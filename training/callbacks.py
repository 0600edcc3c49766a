"""Lightning callbacks of a pretraining run: atomic resume checkpoints, metrics CSV, throughput, exports."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import lightning as L
import torch

from infra.console import Progress
from infra.storage import atomic_write_json, commit, fsync_dir
from training.checkpoint import export_backbone, export_bundle, load_official_state_dict
from training.distributed import barrier
from training.fsdp import full_state_dict
from training.layers import DINOHead
from training.metrics import MetricsWriter
from training.vision_transformer import DinoVisionTransformer

PROGRESS = "progress.json"
TMP_PREFIX = ".last.ckpt.tmp"  # + the step: a checkpoint being written (a file, or a directory when sharded)
log = logging.getLogger(__name__)


def checkpoint_complete(path: Path) -> bool:
    """Whether `path` is a whole checkpoint: a torch zip archive (its central directory is written last) or a sharded
    directory holding DCP's `.metadata` and Lightning's `meta.pt` (written last, by rank 0)."""
    if path.is_file():
        return zipfile.is_zipfile(path)
    return (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace `final` with the complete `tmp`; the previous checkpoint stays until the new one is whole.

    A file is renamed over `final` in one step. A sharded directory cannot be, so `final` first moves to
    `final.old`; a crash between the two renames leaves `.old`, which `find_resume_checkpoint` falls back to.
    """
    old = final.with_name(final.name + ".old")
    if tmp.is_file():
        commit(tmp, final)  # fsync + atomic rename
        _remove(old)
        return
    if final.exists() and checkpoint_complete(final):
        _remove(old)  # a crash after the second rename left both: `final` is whole, `.old` is not needed
        os.replace(final, old)
    else:
        _remove(final)  # never let a partial `final` replace a whole `.old`
    os.replace(tmp, final)
    fsync_dir(final.parent)
    _remove(old)


def sweep_partial_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Remove checkpoints a killed run was still writing (`.last.ckpt.tmp<step>`); they are never read, and the
    stage sweep (`infra.stage`, names ending in `.tmp`) does not match them."""
    leftovers = sorted(Path(ckpt_dir).glob(TMP_PREFIX + "*")) if Path(ckpt_dir).is_dir() else []
    for path in leftovers:
        _remove(path)
    if leftovers:
        log.info("removed %d partial checkpoint(s) of an interrupted run: %s", len(leftovers),
                 ", ".join(p.name for p in leftovers))
    return leftovers


def find_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """`last.ckpt`, or the `.old` copy left by a crash between the two renames of a directory checkpoint (or when
    `last.ckpt` is incomplete). None when there is neither; an error when what is there is incomplete."""
    candidates = [Path(ckpt_dir) / name for name in ("last.ckpt", "last.ckpt.old")]
    present = [c for c in candidates if c.exists()]
    for path in present:
        if checkpoint_complete(path):
            if path.name != "last.ckpt":
                log.warning("resuming from %s: %s is missing or incomplete", path, candidates[0].name)
            return path
    if present:
        raise RuntimeError(f"no complete resume checkpoint in {ckpt_dir} ({', '.join(p.name for p in present)} "
                           "incomplete); move the checkpoints folder aside to train from scratch")
    return None


def checkpoint_step(path: Path) -> int:
    """The optimiser step a resume checkpoint continues from, without reading its tensors: a file is memory-mapped,
    and a sharded directory keeps the step in Lightning's `meta.pt`."""
    path = Path(path)
    if path.is_dir():
        state = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state["global_step"])


class AtomicCheckpoint(L.Callback):
    """Save `last.ckpt` every `every` steps, at `interrupt_at` (then stop), and at the end of training."""

    def __init__(self, ckpt_dir: Path, every: int, interrupt_at: int | None = None):
        self.path = Path(ckpt_dir) / "last.ckpt"
        self.every = every
        self.interrupt_at = interrupt_at
        self.saved_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # before any rank writes a checkpoint (the first save starts with a barrier)
            sweep_partial_checkpoints(self.path.parent)

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self.saved_step:
            return
        tmp = self.path.with_name(f"{TMP_PREFIX}{trainer.global_step}")
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
        self.logged_step = -1
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.images = 0
        self.global_batch = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.writer.truncate(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now  # throughput excludes the first step (start-up, allocations)
        else:
            self.images += pl_module.derived.global_batch
        self.global_batch = pl_module.derived.global_batch
        self.t_last = now
        self._record(trainer, pl_module)
        if trainer.is_global_zero and trainer.global_step % self.flush_every == 0:
            self.writer.flush()
            self.write_progress(trainer)

    def write_progress(self, trainer: L.Trainer) -> None:
        """`progress.json`: steps done of the run's length, for whoever watches the run (the flow's Prefect progress
        artifact, `lvd status`); written with every flush and at the end."""
        loss = self.last.get("total_loss")
        atomic_write_json(self.writer.out_dir / PROGRESS, {
            "step": trainer.global_step, "total": trainer.max_steps, "images_per_second": round(self.images_per_second, 2),
            "loss": None if loss is None else float(loss), "global_batch": self.global_batch, "time": time.time()})

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the step just trained, once. `AtomicCheckpoint` runs first at a batch end, so its checkpoint is taken
        before this callback's hook: the row goes in then, or a kill right after the checkpoint would lose it."""
        row = pl_module.last_record
        if not row or row["step"] == self.logged_step:
            return
        self.logged_step = row["step"]
        self.last = dict(row)
        if trainer.is_global_zero:
            self.writer.log(self.last)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._record(trainer, pl_module)
        if trainer.is_global_zero:
            self.writer.consolidate()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.writer.consolidate()
            self.write_progress(trainer)

    @property
    def images_per_second(self) -> float:
        if self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            return 0.0
        return self.images / (self.t_last - self.t_first)


class ConsoleProgress(L.Callback):
    """Rank 0's progress on the console (`infra.console`): step of the run's length, loss, images/s and ETA; a rich
    bar on a terminal, a plain line every `LVD_PROGRESS_INTERVAL` seconds otherwise. The images/s exclude the first
    step of this process (start-up, allocations), as `MetricsLogger`'s do."""

    def __init__(self, name: str = "pretrain"):
        self.name = name
        self.progress: Progress | None = None
        self.first = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.progress = Progress(self.name, trainer.max_steps, unit="steps", done=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        p = self.progress
        if p is None or trainer.global_step == p.done:  # (a micro-batch within the step)
            return
        n, loss = trainer.global_step - p.done, pl_module.last_record.get("total_loss")
        p.advance(n, items=n * pl_module.derived.global_batch, **({"loss": float(loss)} if loss is not None else {}))
        if self.first:
            self.first = False
            p.restart_clock()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.progress is not None:
            self.progress.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.progress is not None:
            self.progress.close(failed=True)


class ExportTeacher(L.Callback):
    """At the end of training: the exported model's backbone in the official format (safetensors + .pth) and the
    backbone + heads bundle (`teacher_checkpoint.safetensors`, usable as a distillation teacher or for highres).
    With `period`, the same files every `period` iterations in `eval/training_<iteration>/` (the reference's
    eval_period_iterations; a resumed run rewrites those after its checkpoint with identical weights)."""

    def __init__(self, out_dir: Path, period: int | None = None):
        self.out_dir = Path(out_dir)
        self.period = period

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        iteration = trainer.global_step - 1  # the iteration just trained
        if self.period and (iteration + 1) % self.period == 0:
            self.export(trainer, pl_module, self.out_dir / "eval" / f"training_{iteration}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module, self.out_dir)

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path) -> None:
        modules = pl_module.meta.export_modules()
        template = pl_module.meta.student
        plain = {}
        for name in modules:  # gather (FSDP) into fresh CPU modules of the same structure
            state = full_state_dict(modules[name])
            if trainer.is_global_zero:
                plain[name] = _fresh_copy(template[name], state)
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            export_backbone(plain["backbone"], folder / "teacher_backbone.safetensors")
            export_bundle(plain, folder / "teacher_checkpoint.safetensors")
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
