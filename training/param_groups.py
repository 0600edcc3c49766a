"""Optimiser parameter groups (reference `dinov2/utils/param_groups.py`).

- Layer-wise lr decay: multiplier decay ** (L + 1 - layer_id), with layer_id 0 for pos_embed, patch_embed,
  mask_token, cls_token and register_tokens, block index + 1 for block parameters (chunked names included), and
  L + 1 for everything else (final norm, heads).
- patch_embed: lr multiplier x patch_embed_lr_mult (0.2).
- No weight decay for biases, any name containing "norm", and LayerScale `gamma`.
- Parameters whose name contains "last_layer" (the prototypes) follow the last-layer lr schedule.
Groups with identical (lr_multiplier, wd_multiplier, is_last_layer) are fused.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

_EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
_WRAPPERS = re.compile(r"(_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.|module\.)")


def layer_id(name: str, n_blocks: int, is_backbone: bool) -> int:
    if not is_backbone:
        return n_blocks + 1
    if any(e in name for e in _EMBEDDINGS):
        return 0
    m = re.search(r"(?:^|\.)blocks\.(\d+)\.(\d+)\.", name) or re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    if m:
        return int(m.group(m.lastindex)) + 1  # chunked names: blocks.<chunk>.<global index>
    return n_blocks + 1


def param_group_entries(module: nn.Module, lr_decay_rate: float = 1.0, patch_embed_lr_mult: float = 1.0,
                        is_backbone: bool = False) -> list[dict[str, Any]]:
    n_blocks = getattr(module, "n_blocks", 0) if is_backbone else 0
    out = []
    for raw_name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        name = _WRAPPERS.sub("", raw_name)
        d = {"params": param, "name": name, "is_last_layer": "last_layer" in name,
             "lr_multiplier": lr_decay_rate ** (n_blocks + 1 - layer_id(name, n_blocks, is_backbone)),
             "wd_multiplier": 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0}
        if "patch_embed" in name:
            d["lr_multiplier"] *= patch_embed_lr_mult
        out.append(d)
    return out


def fuse_param_groups(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fused: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for e in entries:
        key = (e["lr_multiplier"], e["wd_multiplier"], e["is_last_layer"])
        group = fused.setdefault(key, {"params": [], "names": [], "lr_multiplier": key[0], "wd_multiplier": key[1],
                                       "is_last_layer": key[2]})
        group["params"].append(e["params"])
        group["names"].append(e["name"])
    return list(fused.values())


def apply_optim_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
