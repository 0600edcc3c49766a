"""Collectives that degrade to no-ops in a single process (the reference's iBOT Sinkhorn crashes there)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max); returns `t`."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_reduce_async(t: torch.Tensor) -> dist.Work | None:
    return dist.all_reduce(t, async_op=True) if is_distributed() else None


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce(t) / world_size() if is_distributed() else t


def barrier() -> None:
    if is_distributed():
        dist.barrier()

