"""SwiGLU feed-forward (ViT-g): packed `w12` (D -> 2H), silu(x1) * x2, then `w3` (H -> D).

The hidden width follows the reference `SwiGLUFFNFused`: H = (int(2/3 * hidden) + 7) // 8 * 8, where `hidden`
is mlp_ratio * D; for ViT-g (D = 1536) that is 4096, so `w12` is 8192 x 1536 as in the released weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_dim(hidden_features: int) -> int:
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFNFused(nn.Module):
    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 bias: bool = True):
        super().__init__()
        out_features = out_features or in_features
        hidden = swiglu_hidden_dim(hidden_features or in_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)
