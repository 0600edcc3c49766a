"""The pretraining core the flow calls: `pretrain(data, out_dir, cfg)` -> `PretrainResult`.

A run directory holds `checkpoints/last.ckpt` (resume checkpoint, replaced atomically), `metrics.csv` (one row per
step), `train_config.yaml` and `derived.json` (the resolved config and derived values), and the exports
`teacher_backbone.safetensors` (+ `.pth`, official key names) and `teacher_checkpoint.safetensors` (backbone +
heads). Calling `pretrain` again on the same directory resumes from the checkpoint and continues exactly; on another
number of processes when the global batch stays the same (see `_check_global_batch`; `derived.json` lists the
run's segments).

CLI (also under torchrun for several processes):
    python -m training.pretrain --data DIR_OR_TARS... --out RUN_DIR [--config configs/x.yaml] [--seed 0]
        [train.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import nn

from infra.config import parse_yaml
from infra.config.train import EXECUTION_KEYS, TrainConfig
from infra.console import quiet_third_parties
from infra.cpus import limit_native_threads
from infra.storage import atomic_write_json, atomic_write_text
from training.callbacks import AtomicCheckpoint, ConsoleProgress, ExportTeacher, MetricsLogger, find_resume_checkpoint
from training.checkpoint import load_backbone, load_bundle
from training.data import build_source
from training.module import DinoV2DataModule, DinoV2Module
from training.registry import build_backbone
from training.schedules import derive
from training.strategy import build_strategy, compute_precision, resolve_accelerator, resolve_precision
from training.weights import init_from_pretrained

__all__ = ["PretrainResult", "build_backbone", "load_backbone", "pretrain"]
log = logging.getLogger(__name__)
# Keys that may change between an interrupted run and its resumption: how it executes (EXECUTION_KEYS; the global
# batch that `devices`, `num_nodes` and `accumulate_grad_batches` give is checked by `_check_global_batch`), how far it
# goes and what it exports or guards, and the follow-up stages' sections.
# The console names a training by its stage (`train.mode`).
STAGE_NAMES = {"pretrain": "pretrain", "highres": "pretrain_highres", "distill": "distill"}
RESUMABLE_CHANGES = {*EXECUTION_KEYS, "eval_period_iterations", "max_steps", "accelerator", "enabled", "collapse_guard",
                     "highres", "distill"}


@dataclass
class PretrainResult:
    steps: int
    checkpoint: Path  # the Lightning/resume checkpoint (last)
    teacher_backbone: Path  # exported teacher backbone, official key names, safetensors
    teacher_bundle: Path  # backbone + heads (`teacher_checkpoint.safetensors`): a highres start or distill teacher
    metrics_csv: Path
    final: dict[str, float]  # last logged values (loss terms, entropy, ...)
    images_per_second: float

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> PretrainResult:
        paths = {"checkpoint", "teacher_backbone", "teacher_bundle", "metrics_csv"}
        return cls(**{k: Path(v) if k in paths else v for k, v in data.items()})


def _check_resumable(out_dir: Path, cfg: TrainConfig) -> None:
    saved = out_dir / "train_config.yaml"
    if not saved.is_file():
        return
    before = parse_yaml(saved.read_text())
    now = cfg.model_dump(mode="json")
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"{out_dir} holds a run with a different train config ({changed}); resume with the same "
                         "config or use a new output directory")


def _check_global_batch(out_dir: Path, cfg: TrainConfig, world_size: int) -> list[dict[str, Any]]:
    """A run may resume on another number of processes when the global batch stays the same (world size x
    `accumulate_grad_batches`, e.g. 8 GPUs -> 4 GPUs x 2 micro-batches): every step then sees the same images, crops and
    masks (micro-batch j of rank r is the batch of rank j x W + r of the run without accumulation), with the same lr
    and schedules. Only the statistics computed per micro-batch (Sinkhorn-Knopp, centering, KoLeo) group the images
    differently, so from the change on the losses are close to, not bit-equal with, those of an uninterrupted run.
    Returns the run's segments (`from_step`, `world_size`, `accumulate_grad_batches`) with this start's appended when
    the layout changes."""
    saved = out_dir / "derived.json"
    before = json.loads(saved.read_text()) if saved.is_file() else {}
    was_world = before.get("world_size", world_size)
    # derived.json of runs from before this key was written: the micro-batches follow from the global batch
    was_accumulate = before.get("accumulate_grad_batches") or max(
        1, before.get("global_batch", 0) // (cfg.batch_size_per_gpu * was_world))
    segments = before.get("segments") or [{"from_step": 0, "world_size": was_world,
                                           "accumulate_grad_batches": was_accumulate}]
    if not before or (was_world, was_accumulate) == (world_size, cfg.accumulate_grad_batches):
        return segments
    was_batch, batch = before["global_batch"], derive(cfg, world_size).global_batch
    if was_batch != batch:
        lanes, per_step = was_batch // cfg.batch_size_per_gpu, cfg.batch_size_per_gpu * world_size
        fits = f"processes x train.accumulate_grad_batches = {lanes}" + (
            f" (here: train.accumulate_grad_batches={was_batch // per_step})" if was_batch % per_step == 0 else "")
        raise ValueError(
            f"{out_dir} was trained with a global batch of {was_batch} ({was_world} processes (devices x num_nodes) x "
            f"{was_accumulate} micro-batches x {cfg.batch_size_per_gpu}) and this start gives {batch} ({world_size} x "
            f"{cfg.accumulate_grad_batches} x {cfg.batch_size_per_gpu}): the lr scaled from it and every sample "
            f"position depend on it, so the run cannot continue. Resume with {fits}, or start a new output directory")
    log.warning("resuming %s on %d processes x %d micro-batches (it ran on %d x %d): the same global batch, data and "
                "schedules; Sinkhorn-Knopp, centering and KoLeo now see the images in other groups, so the losses are "
                "close to, not equal to, those of an uninterrupted run", out_dir, world_size, cfg.accumulate_grad_batches,
                was_world, was_accumulate)
    return [*segments, {"from_step": None, "world_size": world_size,  # the restored step: filled in by RecordDerived
                        "accumulate_grad_batches": cfg.accumulate_grad_batches}]


class RecordDerived(L.Callback):
    """Rank 0 writes `train_config.yaml` and `derived.json` (derived values and the run's segments: from which step
    it ran on how many processes x micro-batches) once the trainer has restored its step."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, segments: list[dict[str, Any]]):
        self.out_dir, self.cfg, self.segments = out_dir, cfg, segments

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        segments = [{**s, "from_step": trainer.global_step if s["from_step"] is None else s["from_step"]}
                    for s in self.segments]
        derived = {**derive(self.cfg, trainer.world_size).as_dict(),
                   "accumulate_grad_batches": self.cfg.accumulate_grad_batches, "segments": segments,
                   "precision": _precision_note(self.cfg)}
        atomic_write_text(self.out_dir / "train_config.yaml",
                          yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
        atomic_write_json(self.out_dir / "derived.json", derived)
        log.info("derived values: %s", json.dumps(derived))


def _precision_note(cfg: TrainConfig) -> str:
    """The precision this run computes in, and why when `train.precision` is auto (written to derived.json)."""
    accelerator = resolve_accelerator(cfg)
    chosen = compute_precision(cfg, accelerator)
    if cfg.precision != "auto":
        return chosen
    if accelerator != "cpu":
        return f"{chosen} (auto on {accelerator})"
    from infra.precision import cpu_bf16_flags, cpu_bf16_speedup

    if not cpu_bf16_flags():
        return f"{chosen} (auto: this CPU has no bf16 matmul instructions)"
    return f"{chosen} (auto: bf16 products measured {cpu_bf16_speedup():.2f}x fp32 on this CPU)"


def _teacher_for(cfg: TrainConfig) -> nn.ModuleDict | None:
    if cfg.mode != "distill":
        return None
    return nn.ModuleDict(load_bundle(cfg.teacher_weights))


def host_processes(cfg: TrainConfig) -> int:
    """The training processes on each host: `devices`, with `auto` = every GPU (GPU runs) or 1 (CPU runs)."""
    if cfg.devices != "auto":
        return cfg.devices
    return torch.cuda.device_count() if resolve_accelerator(cfg) == "gpu" else 1


def build_trainer(cfg: TrainConfig, out_dir: Path, callbacks: list[L.Callback], resume: Path | None = None
                  ) -> L.Trainer:
    accelerator = resolve_accelerator(cfg)
    n_devices = host_processes(cfg)
    strategy = build_strategy(cfg, accelerator, n_devices * cfg.num_nodes, sharded_checkpoint=resume is not None
                              and resume.is_dir())
    return L.Trainer(
        accelerator=accelerator, devices=n_devices, num_nodes=cfg.num_nodes, strategy=strategy,
        precision=resolve_precision(cfg, accelerator), max_steps=derive(cfg, 1).run_iters, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, use_distributed_sampler=False, default_root_dir=str(out_dir))


def pretrain(data: Sequence[Path] | Path, out_dir: Path, cfg: TrainConfig, *, seed: int = 0,
             interrupt_at: int | None = None, callbacks: Sequence[L.Callback] = ()) -> PretrainResult:
    """Train (or resume) a DINOv2 run in `out_dir` on corpus shards or an image folder.

    `interrupt_at`: stop after this many steps with a resumable checkpoint, as if the job were preempted (tests,
    time-sliced jobs); a later call continues from there. `callbacks`: extra Lightning callbacks (progress
    reporting, inspection).
    """
    quiet_third_parties()  # (Lightning is imported by now)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    else:
        limit_native_threads()  # a container's CPU quota, which torch does not read
    source = build_source(data)
    ckpt = find_resume_checkpoint(out_dir / "checkpoints")
    if ckpt is not None:
        _check_resumable(out_dir, cfg)
    module = DinoV2Module(cfg, seed=seed, teacher=_teacher_for(cfg))
    if ckpt is None and cfg.student.pretrained_weights is not None:
        init_from_pretrained(module.meta, cfg.student.pretrained_weights)
    metrics = MetricsLogger(out_dir, flush_every=cfg.log_every)
    trainer = build_trainer(cfg, out_dir, [AtomicCheckpoint(out_dir / "checkpoints", cfg.checkpoint_every, interrupt_at),
                                           metrics, ExportTeacher(out_dir, cfg.eval_period_iterations),
                                           ConsoleProgress(STAGE_NAMES[cfg.mode]), *callbacks], resume=ckpt)
    segments = (_check_global_batch(out_dir, cfg, trainer.world_size) if ckpt is not None else
                [{"from_step": 0, "world_size": trainer.world_size, "accumulate_grad_batches": cfg.accumulate_grad_batches}])
    trainer.callbacks.insert(0, RecordDerived(out_dir, cfg, segments))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
        # Lightning 2.6's CombinedLoader builds a torch `LeafSpec`, deprecated in torch 2.14: one warning per fit from
        # inside Lightning, nothing we call.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree",
                                message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"))
        trainer.fit(module, datamodule=DinoV2DataModule(source, cfg, seed), ckpt_path=ckpt, weights_only=True)
    return PretrainResult(steps=trainer.global_step, checkpoint=out_dir / "checkpoints" / "last.ckpt",
                          teacher_backbone=out_dir / "teacher_backbone.safetensors",
                          teacher_bundle=out_dir / "teacher_checkpoint.safetensors",
                          metrics_csv=out_dir / "metrics.csv", final=metrics.last,
                          images_per_second=metrics.images_per_second)


def main(argv: Sequence[str] | None = None) -> None:
    from infra.config.schema import load_config

    parser = argparse.ArgumentParser(description="DINOv2 pretraining on corpus shards or an image folder")
    parser.add_argument("--data", nargs="+", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", type=Path, default=None, help="pipeline YAML (its train: section is used)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interrupt-at", type=int, default=None)
    parser.add_argument("--result", type=Path, default=None, help="rank 0 writes the PretrainResult here (JSON)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    from infra.console import setup_console

    setup_console()  # (torchrun's children: plain lines into the stage's launch.log)
    cfg = load_config(args.config, args.overrides).train
    data = args.data[0] if len(args.data) == 1 else args.data
    result = pretrain(data, args.out, cfg, seed=args.seed, interrupt_at=args.interrupt_at)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.result is not None:
            atomic_write_json(args.result, result.to_json())
        print(json.dumps({"steps": result.steps, "images_per_second": result.images_per_second, **result.final}))


if __name__ == "__main__":
    main()
