"""timm format, both ways: a state dict that `timm.create_model(<dinov2 name>, pretrained=True,
pretrained_cfg_overlay={"file": ...}, **kwargs)` loads with strict keys, and timm DINOv2 weights read back as a
DINOv2 backbone.

timm's DINOv2 models (`vit_{small,base,large,giant}_patch14[_reg4]_dinov2`) are `VisionTransformer`s: the same
block names (`blocks.<i>.attn.qkv`, `ls1.gamma`, ...), SwiGLU as a packed `mlp.fc1` / `mlp.fc2`, registers as
`reg_token` with `no_embed_class` (the class token carries its own position embedding, the position embedding
holds only the patch grid). A backbone of another size is the nearest name with `embed_dim`, `depth`, `num_heads`,
`mlp_ratio`, `patch_size` overridden. timm interpolates position embeddings to another size with an output size
(offset 0) and antialias, so a backbone trained with the reference's 0.1 offset matches it at its own resolution.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from training.registry import ARCHS

SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "giant": (1536, 40, 24)}
INTERPOLATION = (0.0, True)  # timm's resample_abs_pos_embed: size-based (offset 0), antialias
_SWIGLU = re.compile(r"^(blocks\.\d+\.mlp\.)w(12|3)\.")


def is_swiglu(arch: dict[str, Any]) -> bool:
    return arch["ffn_layer"] in ("swiglu", "swiglufused")


def swiglu_hidden(arch: dict[str, Any]) -> int:
    return (int(int(arch["embed_dim"] * arch["mlp_ratio"]) * 2 / 3) + 7) // 8 * 8


def timm_model(arch: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(timm model name, keyword arguments) that build this architecture at its training resolution."""
    if arch["ffn_layer"] == "identity":
        raise ValueError("timm's ViT has no identity FFN")
    shape = (arch["embed_dim"], arch["depth"], arch["num_heads"])
    named = next((n for n, s in SIZES.items() if s == shape and (n == "giant") == is_swiglu(arch)), None)
    regs = arch["num_register_tokens"]
    size = named or ("giant" if is_swiglu(arch) else "small")
    name = f"vit_{size}_patch14{'_reg4' if regs else ''}_dinov2"
    kwargs: dict[str, Any] = {"img_size": arch["img_size"]}
    if named is None:
        kwargs.update(embed_dim=shape[0], depth=shape[1], num_heads=shape[2])
        # timm's hidden width is int(dim * mlp_ratio) (the packed 2H for SwiGLU): a ratio that rounds to it exactly
        hidden = 2 * swiglu_hidden(arch) if is_swiglu(arch) else int(arch["embed_dim"] * arch["mlp_ratio"])
        kwargs["mlp_ratio"] = (hidden + 0.5) / arch["embed_dim"] if is_swiglu(arch) or hidden % arch["embed_dim"] else (
            hidden // arch["embed_dim"])
    if arch["patch_size"] != 14:
        kwargs["patch_size"] = arch["patch_size"]
    if arch["in_chans"] != 3:
        kwargs["in_chans"] = arch["in_chans"]
    if regs not in (0, 4):
        kwargs["reg_tokens"] = regs
    return name, kwargs


def to_timm_state(state: dict[str, torch.Tensor], arch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Official names -> timm's (no mask token; SwiGLU w12/w3 -> fc1/fc2; registers folded as timm does);
    missing biases are written as zeros and a missing LayerScale as ones (timm's DINOv2 always has them; its
    `create_model` drops an `init_values=None`)."""
    out = {_SWIGLU.sub(lambda m: m[1] + ("fc1." if m[2] == "12" else "fc2."), k): v
           for k, v in state.items() if k != "mask_token"}
    if arch["num_register_tokens"]:
        pos = out.pop("pos_embed")
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]  # no_embed_class: the class token's position added in
        out["pos_embed"] = pos[:, 1:]
    for i in range(arch["depth"]):
        for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            w = out[f"blocks.{i}.{lin}.weight"]
            out.setdefault(f"blocks.{i}.{lin}.bias", torch.zeros(w.shape[0], dtype=w.dtype))
        for ls in ("ls1", "ls2"):
            out.setdefault(f"blocks.{i}.{ls}.gamma", torch.ones(arch["embed_dim"]))
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in out.items()}


def is_timm_state(state: dict[str, torch.Tensor]) -> bool:
    """timm ViT keys: a class token and blocks, and none of the official checkpoint's mask token."""
    return "cls_token" in state and "blocks.0.norm1.weight" in state and "mask_token" not in state


def is_timm_folder(path: Path | str) -> bool:
    """A folder as timm publishes models on the Hugging Face hub (`timm/vit_small_patch14_dinov2.lvd142m`, or what
    `timm.models.push_to_hf_hub` / `save_for_hf` write): a `config.json` naming the timm `architecture` (no
    transformers `model_type`), the weights beside it."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return False
    return isinstance(data, dict) and "architecture" in data and "model_type" not in data


def timm_folder_image_size(folder: Path | str) -> int | None:
    """The input size the folder's `pretrained_cfg` gives its users (timm's published DINOv2: 518 px), else the
    model's `img_size`."""
    data = json.loads((Path(folder) / "config.json").read_text())
    size = (data.get("pretrained_cfg") or {}).get("input_size") or (data.get("model_args") or {}).get("img_size")
    return None if not size else int(size[-1] if isinstance(size, list | tuple) else size)


def read_timm_folder(folder: Path, arch: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(official-named state, architecture) of a timm hub folder of a DINOv2 model."""
    from infra.hub import folder_weights

    data = json.loads((Path(folder) / "config.json").read_text())
    name = data["architecture"]
    if "dinov2" not in name:
        raise ValueError(f"{folder}: timm architecture {name!r} is not a DINOv2 (vit_*_patch14[_reg4]_dinov2); "
                         + ("a DINOv3 is read with backbone kind: dinov3 (as an embedder or evaluation reference)"
                            if "dinov3" in name else "lvd reads DINOv2 backbones"))
    return from_timm_state(folder_weights(folder), None, arch, heads=(data.get("model_args") or {}).get("num_heads"))


def from_timm_state(state: dict[str, torch.Tensor], arch_hint: dict[str, Any] | None = None,
                    arch: str | None = None, heads: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """timm DINOv2 weights -> (official-named state, architecture with timm's interpolation). The head count is
    not in the weights: `heads`, or from `arch_hint` (the export's sidecar), the registry entry `arch`, or the
    registry entry of the same width and depth."""
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    dim = state["cls_token"].shape[-1]
    out = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in state.items()} if (
        _is_packed_swiglu(state)) else dict(state)
    regs = out["reg_token"].shape[1] if "reg_token" in out else 0
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
    pos = out["pos_embed"]
    n = pos.shape[1]
    if math.isqrt(n) ** 2 == n:  # no_embed_class: the grid only; the class token already holds its position
        out["pos_embed"] = torch.cat([torch.zeros(1, 1, dim, dtype=pos.dtype), pos], dim=1)
    out["mask_token"] = torch.zeros(1, dim)
    depth = 1 + max(int(m[1]) for k in out if (m := re.match(r"^blocks\.(\d+)\.", k)))
    grid = math.isqrt(out["pos_embed"].shape[1] - 1)
    patch = out["patch_embed.proj.weight"].shape[-1]
    kwargs = {
        "img_size": grid * patch, "patch_size": patch, "in_chans": out["patch_embed.proj.weight"].shape[1],
        "embed_dim": dim, "depth": depth, "num_heads": heads or _heads(dim, depth, arch_hint, arch), "mlp_ratio": 4.0,
        "qkv_bias": True, "proj_bias": True, "ffn_bias": True,
        "init_values": 1.0 if "blocks.0.ls1.gamma" in out else None,
        "ffn_layer": "swiglufused" if "blocks.0.mlp.w12.weight" in out else "mlp", "num_register_tokens": regs,
        "interpolate_offset": INTERPOLATION[0], "interpolate_antialias": INTERPOLATION[1],
    }
    gammas = [v for k, v in out.items() if k.endswith(".gamma")]
    if gammas and all(bool((g == 1).all()) for g in gammas):  # LayerScale of ones: the export of a backbone without
        out = {k: v for k, v in out.items() if not k.endswith(".gamma")}
        kwargs["init_values"] = None
    if arch_hint:
        kwargs["mlp_ratio"] = arch_hint["mlp_ratio"]
    elif kwargs["ffn_layer"] == "mlp":
        kwargs["mlp_ratio"] = out["blocks.0.mlp.fc1.weight"].shape[0] / dim
    return out, kwargs


def _is_packed_swiglu(state: dict[str, torch.Tensor]) -> bool:
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def _heads(dim: int, depth: int, hint: dict[str, Any] | None, arch: str | None) -> int:
    if hint is not None:
        return int(hint["num_heads"])
    if arch is not None:
        return int(ARCHS[arch]["num_heads"])
    known = [a for a in ARCHS.values() if a["embed_dim"] == dim and a["depth"] == depth]
    return known[0]["num_heads"] if known else max(dim // 64, 1)
