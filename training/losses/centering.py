"""Softmax centering of teacher logits with an EMA center (DINO), lagged one step like the reference.

`softmax(t - center) / T` uses the center *before* this step's batch: the batch statistic is all-reduced
asynchronously in `update` and folded into the center (momentum 0.9) at the next `softmax_center` call. The
pending statistic is part of the state dict (`pending_mean`, `has_pending`) so that a resumed run reproduces an
uninterrupted one exactly.

The statistic is the per-rank mean of the teacher logits, averaged over ranks: for DINO (equal rows per rank)
this is the reference's sum / (rows x world size); for iBOT it is the reference's mean over masked tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from training.distributed import all_reduce_async, world_size
from training.losses.numerics import upcast


class SoftmaxCentering(nn.Module):
    def __init__(self, out_dim: int, center_momentum: float = 0.9):
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("pending_mean", torch.zeros(1, out_dim))
        self.register_buffer("has_pending", torch.zeros((), dtype=torch.bool))
        self._work = None  # an in-flight all-reduce of `_pending_sum`
        self._pending_sum: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Queue this step's statistic ([M, K] logits); applied at the next `softmax_center`."""
        self._resolve()
        self._pending_sum = teacher_logits.float().mean(dim=0, keepdim=True)  # 1, K
        self._work = all_reduce_async(self._pending_sum)
        self.has_pending.fill_(True)

    @torch.no_grad()
    def _resolve(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._pending_sum is not None:
            self.pending_mean.copy_(self._pending_sum / world_size())
            self._pending_sum = None

    @torch.no_grad()
    def apply_pending(self) -> None:
        self._resolve()
        if bool(self.has_pending):
            m = self.center_momentum
            self.center.mul_(m).add_(self.pending_mean, alpha=1 - m)
            self.has_pending.fill_(False)

    @torch.no_grad()
    def softmax_center(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """[M, K] logits -> [M, K] fp32 probabilities softmax((t - center) / T)."""
        self.apply_pending()
        with torch.autocast(teacher_logits.device.type, enabled=False):
            return torch.softmax((upcast(teacher_logits) - self.center) / teacher_temp, dim=-1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        self._resolve()  # a checkpoint holds the reduced statistic, never an in-flight one
        super()._save_to_state_dict(destination, prefix, keep_vars)
