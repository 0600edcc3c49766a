"""Stochastic depth for packed token groups (see `attention.py` for the packing layout).

Two variants, as in the reference `layers/block.py`:
- standard per-sample drop path (`DropPath`, rates in (0, 0.1]): the branch output of a dropped image is zeroed
  and kept images are scaled by 1/(1 - d);
- the efficient variant (rates > 0.1): the residual branch is computed only on a random subset of
  max(int(B * (1 - d)), 1) images of each group and added back with `index_add`, scaled by B / subset, so the
  dropped images cost no compute (`subset_rows`).
Randomness comes from the global torch RNG (seeded per step by the trainer, which makes resume exact).
"""

from __future__ import annotations

import torch
from torch import nn

from training.layers.attention import Groups


def sample_keep_scale(groups: Groups, drop: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-row multiplier [T, 1]: 0 for rows of dropped images, 1/(1-d) for kept ones."""
    keep = 1.0 - drop
    scales = []
    for b, n in groups:
        per_image = torch.empty(b, device=device, dtype=dtype).bernoulli_(keep)
        if keep > 0:
            per_image.div_(keep)
        scales.append(per_image.repeat_interleave(n))
    return torch.cat(scales).unsqueeze(-1)


class DropPath(nn.Module):
    """Per-sample drop path on packed rows [T, D] (or [B, N, D] as a single group)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, groups: Groups | None = None) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        if x.dim() == 3:
            b, n, d = x.shape
            return self.forward(x.reshape(b * n, d), ((b, n),)).view(b, n, d)
        assert groups is not None
        return x * sample_keep_scale(groups, self.drop_prob, x.device, x.dtype)


def subset_rows(groups: Groups, drop: float, device: torch.device) -> tuple[torch.Tensor, Groups, list[float]]:
    """Pick a random subset of images per group for the efficient drop path.

    Returns the packed row indices of the kept images (sorted by group, then by the random order), the groups
    of the subset, and the residual scale factor B / subset of each group.
    """
    rows, sub_groups, factors = [], [], []
    offset = 0
    for b, n in groups:
        keep = max(int(b * (1 - drop)), 1)
        idx = torch.randperm(b, device=device)[:keep]  # which images get the residual
        rows.append((offset + idx[:, None] * n + torch.arange(n, device=device)).flatten())
        sub_groups.append((keep, n))
        factors.append(b / keep)
        offset += b * n
    return torch.cat(rows), tuple(sub_groups), factors
