"""Multi-head self-attention with block-diagonal attention over packed token groups.

Sequence packing (reference: xFormers `BlockDiagonalMask` over the list of crops) is expressed here as
*groups*: tokens arrive flattened as [T, D] together with `groups = ((B_1, N_1), (B_2, N_2), ...)`, where
group i holds B_i images of N_i tokens each and T = sum(B_i * N_i). Linear layers run once over all T tokens;
attention runs per group as a batch of independent sequences via `F.scaled_dot_product_attention`. This is exactly
block-diagonal attention (no token attends across images), without the O(T^2) masked waste of a dense
block-diagonal mask (which computes every cross-image score: T^2 against sum_i B_i N_i^2).

Kernel per group (`attend`): on a GPU, SDPA (flash / memory-efficient kernels). On a CPU, short sequences (local
crops, the demo's crops: N <= MATH_MAX_TOKENS) take the explicit product softmax(q k^T / sqrt(d)) v with the softmax in
fp32: torch's CPU flash kernel is slow there, most of all in bf16 (fwd + bwd, 1 thread, [B, H, N, d/H]: ViT-S local
crops [16, 6, 50, 64] 24.7 ms in bf16 SDPA against 4.9 ms; the demo's [64, 4, 17, 32] 19.1 against 1.8 ms; fp32 6.6
against 5.5 and 2.5 against 1.7 ms). Longer sequences keep the flash kernel, which stores no N x N scores; on a CPU it
runs in fp32 (bf16 inputs are upcast: [4, 6, 257, 64] 27 ms against 31 ms in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Groups = tuple[tuple[int, int], ...]
MATH_MAX_TOKENS = 128  # CPU: explicit attention up to this sequence length (scores B x H x N x N stay small)


def group_sizes(groups: Groups) -> list[int]:
    return [b * n for b, n in groups]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, groups: Groups | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, D] (one group), or packed [T, D] with `groups`; `rows` (packed input only): return only these
        rows [R, D], the output projection computed on them alone."""
        if x.dim() == 3:
            b, n, d = x.shape
            return self.forward(x.reshape(b * n, d), ((b, n),)).view(b, n, d)
        assert groups is not None and sum(group_sizes(groups)) == x.shape[0], "groups do not cover the tokens"
        qkv = self.qkv(x)  # T, 3D
        chunks = qkv.split(group_sizes(groups)) if len(groups) > 1 else (qkv,)
        out = [self._attend(c, b, n) for c, (b, n) in zip(chunks, groups, strict=True)]
        o = out[0] if len(out) == 1 else torch.cat(out)
        return self.proj(o if rows is None else o.index_select(0, rows))

    def _attend(self, qkv: torch.Tensor, b: int, n: int) -> torch.Tensor:
        d = qkv.shape[-1] // 3
        h = self.num_heads
        # 3, B, H, N, d/H made contiguous: the backward then hands the qkv layer one dense gradient, not a strided one
        # (ViT-S packed crops, qkv + attention + proj forward and backward, 1 thread: 125 -> 110 ms).
        q, k, v = qkv.view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        return attend(q, k, v).transpose(1, 2).reshape(b * n, d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, H, N, d] (scale 1/sqrt(d/H) as the reference); see the module docstring
    for the kernel chosen."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v)
    low = q.dtype in (torch.bfloat16, torch.float16)
    if q.shape[-2] <= MATH_MAX_TOKENS:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # B, H, N, N
        return torch.softmax(scores, dim=-1, dtype=torch.float32 if low else None).to(v.dtype) @ v
    if not low:
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", enabled=False):  # CPU autocast would run SDPA in bf16 again
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
