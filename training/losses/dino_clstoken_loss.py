"""DINO loss on class tokens: cross-entropy between teacher targets and student log-softmax (temperature 0.1).

loss = sum over student views s and teacher views t of -mean_rows( sum_k t[k] * log_softmax(s / 0.1)[k] ).
The meta-architecture divides by the number of (teacher, student) pairs of different views, as the reference.
Since the inner sum is linear in t, the teacher views are summed once before the product (same value,
fewer operations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.losses.centering import SoftmaxCentering
from training.losses.numerics import upcast
from training.losses.sinkhorn import sinkhorn_knopp


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.centering = SoftmaxCentering(out_dim, center_momentum)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return self.centering.softmax_center(teacher_logits, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        self.centering.update(teacher_logits)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    def forward(self, student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor]) -> torch.Tensor:
        """student_logits: views of [B, K] logits; teacher_probs: views of [B, K] targets. Returns a scalar."""
        with torch.autocast(student_logits[0].device.type, enabled=False):
            t_sum = torch.stack([upcast(t) for t in teacher_probs]).sum(0)  # B, K
            s = torch.stack([upcast(x) for x in student_logits])  # S, B, K
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            return -(lsm * t_sum).sum(dim=-1).mean(dim=-1).sum()
