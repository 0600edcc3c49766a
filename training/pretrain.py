"""The pretraining core the flow calls: `pretrain(data, out_dir, cfg)` -> `PretrainResult`.

A run directory holds `checkpoints/last.ckpt` (resume checkpoint, replaced atomically), `metrics.csv` (one row per
step), `train_config.yaml` and `derived.json` (the resolved config and derived values), and the exports
`teacher_backbone.safetensors` (+ `.pth`, official key names) and `teacher_checkpoint.safetensors` (backbone +
heads). Calling `pretrain` again on the same directory resumes from the checkpoint and continues exactly.

CLI (also under torchrun for several processes):
    python -m training.pretrain --data DIR_OR_TARS... --out RUN_DIR [--config configs/x.yaml] [--seed 0]
        [train.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
import yaml
from torch import nn

from infra.config.train import TrainConfig
from infra.storage import atomic_write_json, atomic_write_text
from training.callbacks import AtomicCheckpoint, ExportTeacher, MetricsLogger, find_resume_checkpoint
from training.checkpoint import load_backbone, load_bundle
from training.data import build_source
from training.module import DinoV2DataModule, DinoV2Module
from training.registry import build_backbone
from training.schedules import derive
from training.strategy import build_strategy, resolve_accelerator, resolve_precision
from training.weights import init_from_pretrained

__all__ = ["PretrainResult", "build_backbone", "load_backbone", "pretrain"]
log = logging.getLogger(__name__)
# Keys that may change between an interrupted run and its resumption without breaking exactness (`devices` and
# `num_nodes` only in how they are written: the number of processes they give is checked by `_check_world_size`).
RESUMABLE_CHANGES = {"num_workers", "log_every", "checkpoint_every", "eval_period_iterations", "max_steps", "devices",
                     "num_nodes", "accelerator", "cpu_threads", "enabled", "collapse_guard", "highres", "distill",
                     "activation_checkpointing"}


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
    before = yaml.safe_load(saved.read_text())
    now = cfg.model_dump(mode="json")
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"{out_dir} holds a run with a different train config ({changed}); resume with the same "
                         "config or use a new output directory")


def _check_world_size(out_dir: Path, world_size: int) -> None:
    """`devices` and `num_nodes` may be spelled differently on resume (`auto` vs 8), but the number of processes
    must not change: the global batch, the lr scaled from it and every sample position depend on it."""
    saved = out_dir / "derived.json"
    before = json.loads(saved.read_text()).get("world_size") if saved.is_file() else None
    if before is not None and before != world_size:
        raise ValueError(
            f"{out_dir} was trained on {before} processes (devices x num_nodes) and this start has {world_size}: the "
            "global batch, the lr scaled from it and every sample position depend on it, so the run cannot continue "
            f"exactly. Resume with {before} processes, or start a new output directory")


def _teacher_for(cfg: TrainConfig) -> nn.ModuleDict | None:
    if cfg.mode != "distill":
        return None
    return nn.ModuleDict(load_bundle(cfg.teacher_weights))


def host_processes(cfg: TrainConfig) -> int:
    """The training processes on each host: `devices`, with `auto` = every GPU (GPU runs) or 1 (CPU runs)."""
    if cfg.devices != "auto":
        return cfg.devices
    return torch.cuda.device_count() if resolve_accelerator(cfg) == "gpu" else 1


def build_trainer(cfg: TrainConfig, out_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    accelerator = resolve_accelerator(cfg)
    n_devices = host_processes(cfg)
    strategy = build_strategy(cfg, accelerator, n_devices * cfg.num_nodes)
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    source = build_source(data)
    ckpt = find_resume_checkpoint(out_dir / "checkpoints")
    if ckpt is not None:
        _check_resumable(out_dir, cfg)
    module = DinoV2Module(cfg, seed=seed, teacher=_teacher_for(cfg))
    if ckpt is None and cfg.student.pretrained_weights is not None:
        init_from_pretrained(module.meta, cfg.student.pretrained_weights)
    metrics = MetricsLogger(out_dir, flush_every=cfg.log_every)
    trainer = build_trainer(cfg, out_dir, [AtomicCheckpoint(out_dir / "checkpoints", cfg.checkpoint_every, interrupt_at),
                                           metrics, ExportTeacher(out_dir, cfg.eval_period_iterations), *callbacks])
    if ckpt is not None:
        _check_world_size(out_dir, trainer.world_size)
    if trainer.is_global_zero:
        atomic_write_text(out_dir / "train_config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        derived = derive(cfg, trainer.world_size)
        atomic_write_json(out_dir / "derived.json", derived.as_dict())
        log.info("derived values: %s", json.dumps(derived.as_dict()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides).train
    data = args.data[0] if len(args.data) == 1 else args.data
    result = pretrain(data, args.out, cfg, seed=args.seed, interrupt_at=args.interrupt_at)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.result is not None:
            atomic_write_json(args.result, result.to_json())
        print(json.dumps({"steps": result.steps, "images_per_second": result.images_per_second, **result.final}))


if __name__ == "__main__":
    main()
