"""FSDP for the student/teacher pair, as in the reference (`dinov2/fsdp`), without Lightning.

Every student and teacher submodule (backbone, dino_head, ibot_head, and the distillation EMA) is its own FSDP
root with transformer blocks as nested wrap units. Student and teacher therefore have identical flat-parameter
layouts, and the EMA update runs on the local shards (`ema_tensors`) after every unit is resharded and its
unsharded copy freed (SHARD_GRAD_OP keeps the all-gathered copy after a no-grad forward and would reuse it,
silently dropping the update; the reference reshards the teacher after its forward for the same reason). Mixed precision:
bf16/fp16 parameters; gradients of the student *heads* are reduced in fp32 (the paper's "head gradients reduced
in fp32"), the backbone's in the compute dtype; buffers stay fp32.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from infra.config.train import TrainConfig
from training.layers import Block

log = logging.getLogger(__name__)
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision(precision: str, reduce_fp32: bool) -> Any:
    """FSDP's MixedPrecision for a resolved precision ("bf16" / "fp16" / "fp32", see
    `training.strategy.compute_precision`; never "auto"): None for fp32, else low-precision parameters and
    gradient reduction (fp32 reduction when `reduce_fp32`), fp32 buffers."""
    from torch.distributed.fsdp import MixedPrecision

    if precision == "fp32":
        return None
    if precision not in LOW_PRECISION:
        raise ValueError(f"FSDP needs a resolved precision (bf16, fp16 or fp32), not {precision!r}")
    dtype = LOW_PRECISION[precision]
    return MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32 if reduce_fp32 else dtype,
                          buffer_dtype=torch.float32)


def sharding(cfg: TrainConfig, device: torch.device, devices_per_node: int | None) -> tuple[Any, Any]:
    """FSDP's (ShardingStrategy, device mesh) for `train.fsdp_sharding`. HYBRID_SHARD gets an explicit (nodes x
    devices per node) mesh: left to itself, FSDP takes a node's size from `device_count()`, which is 1 where each
    process sees one GPU (SLURM's --gpus-per-task=1) or on the CPU, and with a shard group of one process it falls
    back to NO_SHARD over that group alone, so nothing is ever reduced across nodes and the replicas drift apart
    silently. With one device per node there is nothing to shard inside a node: NO_SHARD over all processes is
    HYBRID_SHARD's meaning there."""
    import torch.distributed as dist
    from torch.distributed.fsdp import ShardingStrategy

    kind = cfg.fsdp_sharding
    if kind != "HYBRID_SHARD":
        return getattr(ShardingStrategy, kind), None
    world = dist.get_world_size()
    local = devices_per_node or world
    if world % local:
        raise ValueError(f"HYBRID_SHARD: {world} processes are not whole nodes of {local} devices")
    if local == 1:
        if dist.get_rank() == 0:
            log.warning("train.fsdp_sharding=HYBRID_SHARD with one device per node: nothing to shard inside a "
                        "node, training replicates over all %d processes (NO_SHARD)", world)
        return ShardingStrategy.NO_SHARD, None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))
    return ShardingStrategy.HYBRID_SHARD, mesh


def wrap_fsdp(groups: dict[str, nn.ModuleDict], cfg: TrainConfig, device: torch.device, precision: str,
              devices_per_node: int | None = None) -> None:
    """Wrap every submodule of each ModuleDict (student, teacher, ema) in place; `precision` is the resolved
    compute precision (`training.strategy.compute_precision`), the one Lightning's autocast uses;
    `devices_per_node` (default: all processes on one node) places HYBRID_SHARD's shard groups (see `sharding`)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy, mesh = sharding(cfg, device, devices_per_node)
    for group_name, modules in groups.items():
        for name in list(modules.keys()):
            if isinstance(modules[name], FSDP):
                continue
            head_grads_fp32 = group_name == "student" and name != "backbone"
            modules[name] = FSDP(
                modules[name], auto_wrap_policy=ModuleWrapPolicy({Block}),
                sharding_strategy=strategy, device_mesh=mesh,
                mixed_precision=mixed_precision(precision, head_grads_fp32), device_id=device, use_orig_params=True,
                # Broadcast rank 0's initialisation (GPU only; on CPU every rank seeds the same init anyway).
                sync_module_states=device.type == "cuda")


def ema_tensors(module: nn.Module) -> list[torch.Tensor]:
    """What an EMA update should touch: the local flat-parameter shards of every FSDP unit in `module`, or the
    plain parameters of an unwrapped module (same order for a student and its identically built teacher)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._runtime_utils import _reshard

    if not is_fsdp(module):
        return [p.detach() for p in module.parameters()]
    out = []
    for unit in FSDP.fsdp_modules(module):
        handle = unit._handle
        if handle is None:
            continue
        if handle.uses_sharded_strategy and hasattr(handle.flat_param, "_local_shard"):  # lazily initialised
            # Free the padded unsharded copy too: SHARD_GRAD_OP keeps it after a no-grad forward and would reuse
            # it (stale) at the next forward instead of all-gathering the updated shards.
            _reshard(unit, handle, True)
        out.append(handle.flat_param.detach())
    return out


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
