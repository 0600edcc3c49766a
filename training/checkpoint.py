"""Weights in and out: the official DINOv2 backbone format, safetensors exports, and safe loading.

- Official format: a flat state dict with the released key names (`blocks.<i>.*`, chunking flattened), as in
  `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`; `.pth` files are read with `torch.load(weights_only=True)`.
- Project exports: safetensors with the same key names and, in the metadata, the architecture that rebuilds the
  model (`lvd_backbone` JSON); a bundle (`teacher_checkpoint.safetensors`) adds the heads under `dino_head.` /
  `ibot_head.` with their sizes. Nothing is ever unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from infra.storage import atomic_path
from training.layers import DINOHead
from training.registry import ARCHS
from training.vision_transformer import DinoVisionTransformer

FORMAT = "lvd.dinov2.v1"
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_FLAT = re.compile(r"^blocks\.(\d+)\.")
# Prefixes that wrap a backbone state dict in training checkpoints (reference, DDP, FSDP, this project).
_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_orig_mod.", "backbone.")


def official_state_dict(backbone: DinoVisionTransformer) -> dict[str, torch.Tensor]:
    """Released key names: chunked `blocks.<c>.<i>.` becomes `blocks.<i>.`; tensors detached, contiguous, CPU."""
    out = {}
    for k, v in backbone.state_dict().items():
        out[_CHUNKED.sub(r"blocks.\2.", k) if backbone.chunked_blocks else k] = v.detach().cpu().contiguous()
    return out


def load_official_state_dict(backbone: DinoVisionTransformer, state: Mapping[str, torch.Tensor],
                             strict: bool = True) -> Any:
    """Load released key names into a (possibly chunked) backbone."""
    if backbone.chunked_blocks:
        size = len([b for b in backbone.blocks[0] if not isinstance(b, nn.Identity)])
        state = {_FLAT.sub(lambda m: f"blocks.{int(m[1]) // size}.{m[1]}.", k): v for k, v in state.items()}
    return backbone.load_state_dict(dict(state), strict=strict)


def strip_prefixes(state: Mapping[str, Any], prefixes: tuple[str, ...] = _PREFIXES) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def infer_arch_kwargs(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Rebuild arguments from an official backbone state dict (heads are read from the registry by size)."""
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(m[1]) for k in state if (m := _FLAT.match(k)))
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    known = [a for a in ARCHS.values() if a["embed_dim"] == dim and a["depth"] == depth]
    heads = known[0]["num_heads"] if known else max(dim // 64, 1)
    return {
        "img_size": grid * patch, "patch_size": patch, "in_chans": state["patch_embed.proj.weight"].shape[1],
        "embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_ratio": 4.0,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state, "proj_bias": "blocks.0.attn.proj.bias" in state,
        "ffn_bias": any(k.startswith("blocks.0.mlp.") and k.endswith(".bias") for k in state),
        "init_values": 1.0 if "blocks.0.ls1.gamma" in state else None,
        "ffn_layer": "swiglufused" if "blocks.0.mlp.w12.weight" in state else "mlp",
        "num_register_tokens": regs,
        # Hub convention: register models use offset 0 and antialias; the others the 0.1 legacy offset.
        "interpolate_offset": 0.0 if regs else 0.1, "interpolate_antialias": bool(regs),
    }


def save_safetensors(state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, Any]) -> Path:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = {"format": FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    # safetensors hands the metadata over as a Rust HashMap: its order differs from process to process (and call to
    # call), so anything built by iterating it must not see that order.
    decoded = {k: json.loads(meta[k]) for k in sorted(meta) if k != "format"}
    return tensors, decoded


def export_backbone(backbone: DinoVisionTransformer, path: Path, official_pth: bool = True) -> Path:
    """Write `<path>` (.safetensors, arch in metadata) and, optionally, the official `.pth` beside it."""
    path = Path(path)
    state = official_state_dict(backbone)
    save_safetensors(state, path, {"lvd_backbone": backbone.arch_kwargs})
    if official_pth:
        with atomic_path(path.with_suffix(".pth")) as tmp:
            torch.save(state, tmp)
    return path


def export_bundle(modules: Mapping[str, nn.Module], path: Path) -> Path:
    """Backbone + heads in one safetensors file (the reference's `teacher_checkpoint.pth`, without pickle)."""
    state: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, module in modules.items():
        sd = official_state_dict(module) if isinstance(module, DinoVisionTransformer) else module.state_dict()
        state.update({f"{name}.{k}": v for k, v in sd.items()})
        meta[f"lvd_{name}"] = module.arch_kwargs if isinstance(module, DinoVisionTransformer) else module.head_kwargs
    return save_safetensors(state, path, meta)


BUNDLE_ORDER = ("backbone", "dino_head", "ibot_head")  # the order SSLMetaArch builds a student and its teacher in


def load_bundle(path: Path) -> dict[str, nn.Module]:
    """Rebuild the modules of `export_bundle` (or a backbone-only export, as {"backbone": ...}), always in
    `BUNDLE_ORDER`: a distillation teacher's module order is its parameter order, which DDP's start-up broadcast and
    FSDP's wrapping follow on every rank; an order that differed between processes silently gave every rank but the
    first a teacher with its tensors swapped between modules (DDP) or mismatched collectives (FSDP)."""
    tensors, meta = read_safetensors(Path(path))
    if "lvd_backbone" in meta and not any(k.startswith("backbone.") for k in tensors):
        tensors = {f"backbone.{k}": v for k, v in tensors.items()}
    out: dict[str, nn.Module] = {}
    rank = {name: i for i, name in enumerate(BUNDLE_ORDER)}
    for key, kwargs in sorted(meta.items(), key=lambda kv: (rank.get(kv[0].removeprefix("lvd_"), len(rank)), kv[0])):
        name = key.removeprefix("lvd_")
        module = DinoVisionTransformer(**kwargs) if name == "backbone" else DINOHead(**kwargs)
        sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        module.load_state_dict(sub, strict=True)
        out[name] = module
    return out


def read_backbone_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Official-named backbone tensors and, for project exports, the recorded architecture."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, meta = read_safetensors(path)
        if any(k.startswith("backbone.") for k in tensors):
            tensors = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        return tensors, meta.get("lvd_backbone")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("teacher", "model", "state_dict"):  # reference training / eval checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    state = strip_prefixes(obj)
    return {k: v for k, v in state.items() if not k.startswith(("dino_head.", "ibot_head."))}, None


def load_backbone(path: Path | str, arch: str | None = None, **overrides: Any) -> DinoVisionTransformer:
    """A backbone from a project safetensors export or an official DINOv2 `.pth` (strict key match).

    For `.pth` files the architecture is inferred from the tensor shapes; `arch` (a registry name) pins the
    head count and `overrides` set anything else (e.g. `interpolate_offset`).
    """
    state, kwargs = read_backbone_state(Path(path))
    if kwargs is None:
        kwargs = infer_arch_kwargs(state)
        if arch is not None:
            kwargs["num_heads"] = ARCHS[arch]["num_heads"]
    backbone = DinoVisionTransformer(**{**kwargs, **overrides})
    load_official_state_dict(backbone, state, strict=True)
    return backbone.eval()
