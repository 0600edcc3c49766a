"""How the training system is distributed: accelerator, precision, and the DDP / FSDP strategies.

- CPU: DDP over gloo (or a single process); bf16 autocast ("bf16-mixed") is the main CPU speed lever.
- GPU: FSDP as in the reference (`dinov2/fsdp`): every student and teacher submodule (backbone, dino_head,
  ibot_head, and the distillation EMA) is its own FSDP root with transformer blocks as nested wrap units, so the
  student and teacher shards line up element for element and the EMA update runs on local shards. Mixed
  precision: bf16/fp16 params; gradients of the student *heads* are reduced in fp32 (the paper's "head gradients
  reduced in fp32"), the backbone's in the compute dtype; buffers stay fp32. Checkpoints are sharded
  (torch.distributed.checkpoint directories, which also handle a change of world size).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy
from torch import nn

from infra.config.train import TrainConfig
from training.layers import Block

PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}


def native_bf16(accelerator: str) -> bool:
    if accelerator == "gpu":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_precision(cfg: TrainConfig, accelerator: str) -> str:
    """Lightning's precision flag; `auto` picks bf16 autocast only where bf16 matmuls are native."""
    name = cfg.precision
    if name == "auto":
        name = "bf16" if native_bf16(accelerator) else "fp32"
    return PRECISION[name]


def resolve_accelerator(cfg: TrainConfig) -> str:
    if cfg.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return cfg.accelerator


def build_strategy(cfg: TrainConfig, accelerator: str, n_processes: int) -> Strategy | str:
    kind = cfg.strategy
    if kind == "auto":
        kind = "fsdp" if accelerator == "gpu" and n_processes > 1 else ("ddp" if n_processes > 1 else "auto")
    if kind == "ddp":
        # Buffers (centers) are kept identical by all-reduces, so DDP need not broadcast them every step.
        return DDPStrategy(process_group_backend="nccl" if accelerator == "gpu" else "gloo", broadcast_buffers=False,
                           find_unused_parameters=False, gradient_as_bucket_view=True)
    if kind == "fsdp":
        # Wrapping happens in `wrap_fsdp` (called from LightningModule.configure_model); Lightning then leaves the
        # already-wrapped module as it is.
        return FSDPStrategy(state_dict_type="sharded", use_orig_params=True,
                            process_group_backend="nccl" if accelerator == "gpu" else "gloo")
    return "auto"


def _mixed_precision(cfg: TrainConfig, reduce_fp32: bool) -> Any:
    from torch.distributed.fsdp import MixedPrecision

    if cfg.precision == "fp32":
        return None
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32 if reduce_fp32 else dtype,
                          buffer_dtype=torch.float32)


def wrap_fsdp(groups: dict[str, nn.ModuleDict], cfg: TrainConfig, device: torch.device) -> None:
    """Wrap every submodule of each ModuleDict (student, teacher, ema) in place."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    for group_name, modules in groups.items():
        for name in list(modules.keys()):
            if isinstance(modules[name], FSDP):
                continue
            head_grads_fp32 = group_name == "student" and name != "backbone"
            modules[name] = FSDP(
                modules[name], auto_wrap_policy=ModuleWrapPolicy({Block}),
                sharding_strategy=getattr(ShardingStrategy, cfg.fsdp_sharding),
                mixed_precision=_mixed_precision(cfg, head_grads_fp32), device_id=device, use_orig_params=True,
                sync_module_states=True)


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(module, FSDP)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (gathered to CPU; complete on rank 0 under FSDP), without wrapper prefixes."""
    if not is_fsdp(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        state = module.state_dict()
    return {k.replace("_fsdp_wrapped_module.", ""): v for k, v in state.items()}


def clip_grad_norm(module: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip one student submodule (the reference clips backbone and each head separately); returns the norm."""
    if is_fsdp(module):
        return module.clip_grad_norm_(max_norm if max_norm else float("inf"))
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"), foreach=True)
