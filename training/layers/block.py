"""Pre-norm transformer block with LayerScale and both stochastic-depth variants, on packed token groups."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from training.layers.attention import Attention, Groups
from training.layers.drop_path import DropPath, subset_rows
from training.layers.layer_scale import LayerScale
from training.layers.mlp import Mlp

# Rates above this use the subset ("efficient") drop path; the reference says the bookkeeping only pays off there.
EFFICIENT_DROP_PATH_MIN = 0.1


class Block(nn.Module):
    """x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x))). Key names match the released checkpoints."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, drop_path: float = 0.0,
                 init_values: float | None = None, ffn_layer: Callable[..., nn.Module] = Mlp,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path
        # The reference applies `drop_path1` to both branches (its FIXME); two modules of equal rate draw
        # independent masks either way, so a single module is used.
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attn_branch(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x), groups))

    def ffn_branch(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, groups: Groups | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, D], or packed [T, D] with `groups` (see `attention.py`). `rows` (packed input): only these output
        rows [R, D] are wanted; without drop path the output projection and the FFN then run on them alone (every
        row still serves as key and value), which is what the last block of a training forward needs."""
        if x.dim() == 3:
            b, n, d = x.shape
            return self.forward(x.reshape(b * n, d), ((b, n),)).view(b, n, d)
        assert groups is not None
        if rows is not None:
            if self.training and self.sample_drop_ratio > 0.0:  # the drop-path draws cover every image: all rows
                return self.forward(x, groups).index_select(0, rows)
            x = x.index_select(0, rows) + self.ls1(self.attn(self.norm1(x), groups, rows))
            return x + self.ffn_branch(x, groups)
        d = self.sample_drop_ratio
        if self.training and d > EFFICIENT_DROP_PATH_MIN:
            x = _subset_residual(x, groups, d, self.attn_branch)
            return _subset_residual(x, groups, d, self.ffn_branch)
        if self.training and d > 0.0:
            x = x + self.drop_path1(self.attn_branch(x, groups), groups)
            return x + self.drop_path1(self.ffn_branch(x, groups), groups)
        x = x + self.attn_branch(x, groups)
        return x + self.ffn_branch(x, groups)


def _subset_residual(x: torch.Tensor, groups: Groups, drop: float,
                     branch: Callable[[torch.Tensor, Groups], torch.Tensor]) -> torch.Tensor:
    """Efficient stochastic depth: residual on a random image subset, added back scaled by B / subset."""
    rows, sub_groups, factors = subset_rows(groups, drop, x.device)
    residual = branch(x.index_select(0, rows), sub_groups).to(x.dtype)  # T_sub, D
    if len(set(factors)) == 1:
        return torch.index_add(x, 0, rows, residual, alpha=factors[0])
    scale = torch.cat([torch.full((b * n, 1), f, dtype=x.dtype, device=x.device)
                       for (b, n), f in zip(sub_groups, factors, strict=True)])
    return torch.index_add(x, 0, rows, residual * scale)


class BlockChunk(nn.ModuleList):
    """A chunk of blocks (an FSDP wrap unit when `block_chunks > 0`); it is padded with `nn.Identity` for the
    blocks of earlier chunks so that parameter names keep the global index: `blocks.<chunk>.<index>.*`."""

    def forward(self, x: torch.Tensor, groups: Groups | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`rows`: as `Block.forward`, applied by the chunk's last block."""
        blocks = [blk for blk in self if not isinstance(blk, nn.Identity)]
        for i, blk in enumerate(blocks):
            x = blk(x, groups, rows if i == len(blocks) - 1 else None)
        return x
