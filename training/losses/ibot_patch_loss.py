"""iBOT masked-patch loss: cross-entropy between teacher targets and student logits at masked positions.

Each masked patch is weighted by 1 / (number of masked patches of its image) (`masks_weight`); the weighted sum
is divided by the number of global-crop images, masked or not (reference `forward_masked`). Teacher targets come
from softmax centering (center = EMA of the mean over masked tokens) or Sinkhorn-Knopp over all masked patches of
all ranks (the count is all-reduced; guarded so that a single process works, unlike the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.losses.centering import SoftmaxCentering
from training.losses.numerics import upcast
from training.losses.sinkhorn import sinkhorn_knopp


class IBOTPatchLoss(nn.Module):
    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.centering = SoftmaxCentering(patch_out_dim, center_momentum)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return self.centering.softmax_center(teacher_logits, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        self.centering.update(teacher_logits)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float, n_masked_patches: int,
                               n_iterations: int = 3) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations, n_samples=n_masked_patches)

    def forward_masked(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks_weight: torch.Tensor,
                       n_images: int) -> torch.Tensor:
        """student_logits, teacher_probs: [M, K] at the M masked patches; masks_weight: [M]. Returns a scalar."""
        with torch.autocast(student_logits.device.type, enabled=False):
            lsm = F.log_softmax(upcast(student_logits) / self.student_temp, dim=-1)
            per_patch = (upcast(teacher_probs) * lsm).sum(dim=-1)  # M
            return -(per_patch * masks_weight.to(per_patch.dtype)).sum() / n_images
