"""KoLeo regulariser (Sablayrolles et al. 2019): -mean_i log(d_i), d_i the distance of each L2-normalised vector
to its nearest neighbour in the batch. Computed per rank, in fp32 with autocast disabled (the reference only
disables CUDA autocast, so on CPU it would run in bf16).

Guards (the reference gives a constant or a ~1e8-scaled gradient along an arbitrary direction in these cases):
batches of fewer than 2 vectors contribute 0, and rows whose nearest neighbour is an exact duplicate are left
out of the mean. Other batches get the reference value: -mean log(||x - x_nn + 1e-8|| + 1e-8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.losses.numerics import upcast


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, D] (pre-head class tokens). Returns a scalar."""
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(upcast(x), p=2, dim=-1, eps=self.eps)
            if x.shape[0] < 2:
                return x.sum() * 0.0  # no neighbour; keeps the graph connected
            with torch.no_grad():
                dots = x @ x.t()
                dots.fill_diagonal_(-1.0)
                nn_idx = dots.argmax(dim=1)  # B
            neighbour = x[nn_idx]
            valid = (x != neighbour).any(dim=-1).detach()  # exact duplicates have no usable direction
            if not bool(valid.any()):
                return x.sum() * 0.0
            dist = F.pairwise_distance(x[valid], neighbour[valid], p=2, eps=self.eps)
            return -torch.log(dist + self.eps).mean()
