"""How the training system is distributed: accelerator, precision, and the DDP / FSDP strategies.

- CPU: DDP over gloo (or a single process); bf16 autocast ("bf16-mixed") is the main CPU speed lever.
- GPU: FSDP as in the reference (`dinov2/fsdp`), see `training/fsdp.py`; checkpoints are sharded
  (torch.distributed.checkpoint directories, which also handle a change of world size).
- FSDP also runs on CPU processes over gloo (`train.strategy=fsdp`, `accelerator=cpu`): the same strategy, wrapping
  and sharded checkpoints as on GPUs, which is how CI trains, checkpoints and reshards the GPU path without a GPU,
  and how a sharded checkpoint resumes on a CPU host.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from infra.config.train import TrainConfig
from infra.precision import native_bf16 as infra_native_bf16
from training.fsdp import clip_grad_norm, full_state_dict, is_fsdp, wrap_fsdp

__all__ = ["PRECISION", "build_strategy", "clip_grad_norm", "compute_precision", "full_state_dict", "is_fsdp",
           "resolve_accelerator", "resolve_precision", "wrap_fsdp"]

PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}


def native_bf16(accelerator: str) -> bool:
    return infra_native_bf16(accelerator)


def compute_precision(cfg: TrainConfig, accelerator: str) -> Literal["bf16", "fp16", "fp32"]:
    """The one resolution of `train.precision` on `accelerator` ("cpu", "gpu" or a device type): `auto` is bf16
    where bf16 matmuls are native, else fp32. Lightning's flag (`resolve_precision`) and FSDP's mixed precision
    (`wrap_fsdp`) both derive from this value, so autocast, gradient scaling and parameter dtypes agree."""
    if cfg.precision == "auto":
        return "bf16" if native_bf16(accelerator) else "fp32"
    return cfg.precision


def resolve_precision(cfg: TrainConfig, accelerator: str) -> str:
    """Lightning's precision flag for `compute_precision` (bf16 / fp16 autocast, the latter with a grad scaler)."""
    return PRECISION[compute_precision(cfg, accelerator)]


def resolve_accelerator(cfg: TrainConfig) -> str:
    if cfg.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return cfg.accelerator


class ShardedStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, unchanged, on GPUs (NCCL) or CPU processes (gloo). Lightning refuses the class
    `FSDPStrategy` itself with the CPU accelerator (an exact-type check in its accelerator connector), although torch's
    FSDP runs there; a subclass is accepted."""


def build_strategy(cfg: TrainConfig, accelerator: str, n_processes: int, sharded_checkpoint: bool = False
                   ) -> Strategy | str:
    """`auto`: FSDP on several GPUs, DDP on several CPU processes, else Lightning's single-device strategy. A run
    resumed from a sharded (FSDP) checkpoint stays on FSDP, on one process and on the CPU too: only FSDP reads
    those directories (torch.distributed.checkpoint reshards them to the new number of ranks)."""
    kind = cfg.strategy
    if kind == "auto":
        kind = ("fsdp" if sharded_checkpoint or (accelerator == "gpu" and n_processes > 1)
                else ("ddp" if n_processes > 1 else "auto"))
    if sharded_checkpoint and kind != "fsdp":
        raise ValueError("this run resumes from a sharded (FSDP) checkpoint, which only train.strategy=fsdp (or "
                         f"auto) reads, not train.strategy={kind}")
    if kind == "ddp":
        # Buffers (centers) are kept identical by all-reduces, so DDP need not broadcast them every step. (torch 2.14
        # deprecates `broadcast_buffers` for this flag; it also syncs them once at init, where every rank holds the
        # same values.)
        return DDPStrategy(process_group_backend="nccl" if accelerator == "gpu" else "gloo",
                           forward_sync_buffers=False, find_unused_parameters=False, gradient_as_bucket_view=True)
    if kind == "fsdp":
        # Wrapping happens in `wrap_fsdp` (called from LightningModule.configure_model); Lightning then leaves the
        # already-wrapped module as it is.
        return ShardedStrategy(state_dict_type="sharded", use_orig_params=True,
                               process_group_backend="nccl" if accelerator == "gpu" else "gloo")
    return "auto"


