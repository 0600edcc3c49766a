"""The DINOv2 vision transformer (reference `dinov2/models/vision_transformer.py`), with a registry of named
architectures.

Token layout: [cls, registers (R), patches (N)]. The mask token replaces masked patch embeddings *before* the cls
token is prepended and the positional embedding is added; registers are inserted after the pos-embed, so they
get none. Lists of crops (`forward_features_list`) run through the blocks as one packed sequence with
block-diagonal attention (see `layers/attention.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.layers import Block, BlockChunk, Mlp, PatchEmbed, SwiGLUFFNFused
from training.layers.attention import Groups


class IdentityFFN(nn.Module):
    """`ffn_layer: identity`: the FFN branch passes its input through (no parameters)."""

    def __init__(self, **_: Any):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


FFN_LAYERS: dict[str, type[nn.Module]] = {"mlp": Mlp, "swiglu": SwiGLUFFNFused, "swiglufused": SwiGLUFFNFused,
                                          "identity": IdentityFFN}


class DinoVisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 ffn_bias: bool = True, proj_bias: bool = True, drop_path_rate: float = 0.0,
                 drop_path_uniform: bool = False, init_values: float | None = None, ffn_layer: str = "mlp",
                 block_chunks: int = 0, num_register_tokens: int = 0, interpolate_antialias: bool = False,
                 interpolate_offset: float = 0.1, pos_embed_init_std: float = 0.02):
        super().__init__()
        # What rebuilds this exact structure (recorded in exports); training-only options are left out.
        self.arch_kwargs: dict[str, Any] = {
            "img_size": img_size, "patch_size": patch_size, "in_chans": in_chans, "embed_dim": embed_dim,
            "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio, "qkv_bias": qkv_bias,
            "ffn_bias": ffn_bias, "proj_bias": proj_bias, "init_values": init_values, "ffn_layer": ffn_layer,
            "num_register_tokens": num_register_tokens, "interpolate_antialias": interpolate_antialias,
            "interpolate_offset": interpolate_offset,
        }
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        # Training only (not part of the architecture): recompute block activations in the backward pass.
        self.activation_checkpointing = False
        self.pos_embed_init_std = pos_embed_init_std  # initialisation only: not in arch_kwargs

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        dpr = [drop_path_rate] * depth if drop_path_uniform else torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        blocks = [Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                        ffn_bias=ffn_bias, drop_path=dpr[i], init_values=init_values, ffn_layer=_ffn(ffn_layer),
                        norm_layer=norm_layer) for i in range(depth)]
        self.chunked_blocks = block_chunks > 0
        if self.chunked_blocks:
            size = depth // block_chunks
            self.blocks = nn.ModuleList([BlockChunk([nn.Identity()] * i + blocks[i:i + size])
                                         for i in range(0, depth, size)])
        else:
            self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        # The reference: trunc_normal(std=0.02) cut at +-2, i.e. +-100 std; another std keeps that cut (the default
        # draws exactly the reference's values). A larger std gives the patch tokens distinct positions from the
        # start (`train.student.pos_embed_init_std`: training/recipes.py measures what that does on a short run).
        s = self.pos_embed_init_std
        nn.init.trunc_normal_(self.pos_embed, std=s, a=-100 * s, b=100 * s)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():  # timm ViT init: every Linear trunc_normal(0.02), zero bias; conv keeps default
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def flat_blocks(self) -> list[Block]:
        """The blocks in order, with chunking (and its Identity padding) removed."""
        if not self.chunked_blocks:
            return list(self.blocks)
        return [b for chunk in self.blocks for b in chunk if not isinstance(b, nn.Identity)]

    # --- tokens -------------------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Pos-embed for an h x w px input ([1, 1+N', D]); bicubic in fp32, with the reference's offset kludge."""
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and h == w:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        dim = x.shape[-1]
        h0, w0 = h // self.patch_size, w // self.patch_size
        m = int(math.sqrt(n))
        assert m * m == n, "pos_embed does not hold a square grid"
        kwargs: dict[str, Any]
        if self.interpolate_offset:
            # Legacy DINO v1 kludge kept for checkpoint compatibility: a scale factor of (h0 + 0.1) / M rather
            # than an output size changes the sampling positions slightly.
            kwargs = {"scale_factor": ((h0 + self.interpolate_offset) / m, (w0 + self.interpolate_offset) / m)}
        else:
            kwargs = {"size": (h0, w0)}
        grid = pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)  # 1, D, M, M
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **kwargs)
        assert grid.shape[-2:] == (h0, w0)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((pos_embed[:, :1], grid), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] (+ masks [B, N] bool) -> tokens [B, 1+R+N, D]."""
        _, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        # No cast of the fp32 cls token: under autocast the concatenation promotes the patch embeddings back to
        # fp32, so the residual stream stays fp32 (as in the reference) and only matmuls run in bf16/fp16.
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    # --- forward ------------------------------------------------------------------------------------------
    def _run_blocks(self, tokens: list[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
        """Pack [B_i, N_i, D] tensors into one [T, D] sequence and run every block once; `rows`: the packed rows the
        last block returns (all when None)."""
        groups: Groups = tuple((t.shape[0], t.shape[1]) for t in tokens)
        d = tokens[0].shape[-1]
        x = tokens[0].reshape(-1, d) if len(tokens) == 1 else torch.cat([t.reshape(-1, d) for t in tokens])
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            r = rows if i == last else None
            # Non-reentrant checkpointing: keeps only the block's input; the backward reruns its forward with the
            # saved RNG state, so the same drop-path samples are dropped.
            x = checkpoint(blk, x, groups, r, use_reentrant=False) if recompute else blk(x, groups, r)
        return x

    def _unpack(self, x: torch.Tensor, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        chunks = x.split([t.shape[0] * t.shape[1] for t in tokens]) if len(tokens) > 1 else (x,)
        return [c.view(t.shape) for c, t in zip(chunks, tokens, strict=True)]

    def _read_rows(self, tokens: list[torch.Tensor], patch_rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                     list[int]]:
        """Packed row indices of every crop's class token and of the selected patch tokens (`patch_rows[i]`: flat
        indices into B_i x N_patches), group by group; and the number of rows of each group."""
        out, sizes, offset = [], [], 0
        for t, sel in zip(tokens, patch_rows, strict=True):
            b, n = t.shape[:2]
            first = 1 + self.num_register_tokens  # first patch token
            p = n - first
            cls = torch.arange(b, device=t.device) * n
            out += [offset + cls, offset + torch.div(sel, p, rounding_mode="floor") * n + first + sel % p]
            sizes.append(b + sel.numel())
            offset += b * n
        return torch.cat(out), sizes

    def _output(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],  # B, D
            "x_norm_regtokens": x_norm[:, 1:r + 1],  # B, R, D
            "x_norm_patchtokens": x_norm[:, r + 1:],  # B, N, D
            "x_prenorm": x,  # B, 1+R+N, D
            "masks": masks,
        }

    def forward_features_list(self, x_list: Sequence[torch.Tensor], masks_list: Sequence[torch.Tensor | None],
                              patch_rows: Sequence[torch.Tensor] | None = None) -> list[dict[str, Any]]:
        """Several crop sizes in one packed forward (sequence packing); one output dict per input.

        `patch_rows` (training): per input, the flat indices (into B_i x N_patches) of the patch tokens the caller
        reads. The last block then computes its output projection and FFN for the class tokens and those patches only
        (all tokens still serve as keys and values: the same values), and each dict holds `x_norm_clstoken` [B_i, D]
        and `x_norm_patchtokens_selected` [M_i, D] (no full token outputs)."""
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list, strict=True)]
        if patch_rows is None:
            outs = self._unpack(self._run_blocks(tokens), tokens)
            return [self._output(x, m) for x, m in zip(outs, masks_list, strict=True)]
        rows, sizes = self._read_rows(tokens, patch_rows)
        x_norm = self.norm(self._run_blocks(tokens, rows)).split(sizes)
        return [{"x_norm_clstoken": x[:t.shape[0]], "x_norm_patchtokens_selected": x[t.shape[0]:], "masks": m}
                for x, t, m in zip(x_norm, tokens, masks_list, strict=True)]

    def forward_features(self, x: torch.Tensor | Sequence[torch.Tensor],
                         masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
                         patch_rows: torch.Tensor | Sequence[torch.Tensor] | None = None) -> Any:
        if isinstance(x, list | tuple):
            return self.forward_features_list(x, masks if masks is not None else [None] * len(x), patch_rows)
        out = self.forward_features_list([x], [masks], None if patch_rows is None else [patch_rows])
        return out[0]

    def forward(self, *args: Any, is_training: bool = False, **kwargs: Any) -> Any:
        ret = self.forward_features(*args, **kwargs)
        return ret if is_training else self.head(ret["x_norm_clstoken"])

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple[Any, ...]:
        """Outputs of the last `n` blocks (int) or of the given 0-based block indices (sequence)."""
        blocks = self.flat_blocks()
        take = set(range(len(blocks) - n, len(blocks))) if isinstance(n, int) else set(n)
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(blocks):
            tokens = blk(tokens)
            if i in take:
                outputs.append(tokens)
        assert len(outputs) == len(take), f"only {len(outputs)} / {len(take)} blocks found"
        if norm:
            outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        outputs = [o[:, 1 + self.num_register_tokens:] for o in outputs]
        if reshape:
            b, _, h, w = x.shape
            p = self.patch_size
            outputs = [o.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens, strict=True))
        return tuple(outputs)


def _ffn(name: str) -> type[nn.Module]:
    if name not in FFN_LAYERS:
        raise ValueError(f"unknown ffn_layer {name!r}; use one of {sorted(FFN_LAYERS)}")
    return FFN_LAYERS[name]
