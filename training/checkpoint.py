"""Weights in and out: the official DINOv2 backbone format, safetensors exports, and safe loading of every DINOv2
checkpoint users hold.

- Official format: a flat state dict with the released key names (`blocks.<i>.*`, chunking flattened), as in
  `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`; `.pth` files are read with `torch.load(weights_only=True)`. The
  `.pth` this project writes has a sidecar `<file>.json` (architecture, training resolution): a plain state dict
  cannot hold metadata without breaking the official strict load.
- Project exports: safetensors with the same key names and, in the metadata, the architecture that rebuilds the
  model (`lvd_backbone` JSON); a bundle (`teacher_checkpoint.safetensors`) adds the heads under `dino_head.` /
  `ibot_head.` with their sizes. Nothing is ever unpickled beyond tensors and plain containers.
- Read as well (`read_checkpoint`): official training checkpoints (block chunks `blocks.<chunk>.<i>.*`, the
  `{"teacher": ...}` of `eval/<iter>/teacher_checkpoint.pth`, `teacher.` / `student.` prefixes, DDP / FSDP wrapper
  names), transformers folders (`training/export/hf.py`) and timm state dicts (`training/export/timm_format.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from infra.hub import hub_snapshot, load_state, snapshot_hint
from infra.storage import atomic_path, atomic_write_text
from training.export.hf import is_hf_folder, read_hf, read_hf_image_size
from training.export.timm_format import (
    from_timm_state,
    is_timm_folder,
    is_timm_state,
    read_timm_folder,
    timm_folder_image_size,
)
from training.layers import DINOHead
from training.registry import ARCHS
from training.vision_transformer import DinoVisionTransformer

FORMAT = "lvd.dinov2.v1"
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_FLAT = re.compile(r"^blocks\.(\d+)\.")
HEADS = ("dino_head", "ibot_head")


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
    """Write `<path>` (.safetensors, arch in metadata) and, optionally, the official `.pth` (+ its sidecar) beside it."""
    path = Path(path)
    state = official_state_dict(backbone)
    save_safetensors(state, path, {"lvd_backbone": backbone.arch_kwargs})
    if official_pth:
        write_official_pth(state, backbone.arch_kwargs, path.with_suffix(".pth"))
    return path


def write_official_pth(state: Mapping[str, torch.Tensor], arch: Mapping[str, Any], path: Path) -> Path:
    """The official state dict (what `torch.hub`'s DINOv2 builders load strictly) and its sidecar `<path>.json`."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    write_sidecar(path, arch)
    return Path(path)


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


# --- the `.pth` sidecar ----------------------------------------------------------------------------------------------
def sidecar_path(weights: Path) -> Path:
    """`<file>.json` beside a weights file that cannot hold metadata without breaking its readers' strict loads (an
    official `.pth` state dict, a timm state dict): the architecture, the training resolution, for timm the
    `create_model` call."""
    weights = Path(weights)
    return weights.with_name(weights.name + ".json")


def write_sidecar(weights: Path, arch: Mapping[str, Any], **extra: Any) -> Path:
    info = {"format": FORMAT, "weights": Path(weights).name, "image_size": arch["img_size"], "lvd_backbone": dict(arch),
            **extra}
    atomic_write_text(sidecar_path(weights), json.dumps(info, indent=2) + "\n")
    return sidecar_path(weights)


def read_sidecar(weights: Path) -> dict[str, Any] | None:
    path = sidecar_path(weights)
    return json.loads(path.read_text()) if path.is_file() else None


# --- reading any DINOv2 checkpoint ---------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A backbone's official-named tensors (blocks flat) with what is known about it, and any DINO / iBOT heads."""

    backbone: dict[str, torch.Tensor]
    arch: dict[str, Any] | None  # None: inferred from the tensor shapes (`infer_arch_kwargs`)
    layout: str  # lvd (project export) | official | hf | timm
    image_size: int | None = None  # the resolution recorded with the weights (None: not recorded)
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def read_checkpoint(path: Path | str, arch: str | None = None) -> Checkpoint:
    """A project export or bundle (.safetensors), an official DINOv2 checkpoint (released `.pth`, a training run's
    `teacher_checkpoint.pth` or `{"model": ...}` checkpoint with `teacher.` / `student.` prefixes, block chunks or
    not), a transformers folder, or a timm DINOv2 state dict. `arch`: a registry name pinning the head count where
    the file does not record it. Only tensors and plain containers are ever unpickled."""
    path = hub_snapshot(path)
    if path.is_dir():
        if is_timm_folder(path):  # (before the transformers test: both have a config.json)
            state, kwargs = read_timm_folder(path, arch)
            return Checkpoint(state, kwargs, "timm", timm_folder_image_size(path))
        if not is_hf_folder(path):
            raise FileNotFoundError(f"{path} is a folder without config.json (not a transformers or timm checkpoint)"
                                    + snapshot_hint(path))
        return _hf_checkpoint(path)
    if path.suffix == ".safetensors":
        tensors, meta = read_safetensors(path)
        if any(k.startswith("lvd_") for k in meta):
            return _bundle_checkpoint(tensors, meta)
        return _state_checkpoint(tensors, path, arch)
    return _state_checkpoint(load_state(path), path, arch)  # (inside reference training / eval checkpoint wrappers)


def _hf_checkpoint(folder: Path) -> Checkpoint:
    state, arch, size = read_hf(folder)
    return Checkpoint(state, arch, "hf", size)


def _bundle_checkpoint(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Checkpoint:
    if not any(k.startswith("backbone.") for k in tensors):  # a backbone export
        tensors = {f"backbone.{k}": v for k, v in tensors.items()}
    parts = _split(tensors)
    arch = meta.get("lvd_backbone")
    return Checkpoint(parts.pop("backbone"), arch, "lvd", arch["img_size"] if arch else None, parts)


def _state_checkpoint(state: Mapping[str, Any], path: Path, arch: str | None) -> Checkpoint:
    state = _select_model(state)
    if any(k.startswith("embeddings.") for k in state):  # a transformers state dict: its config is beside it
        if is_hf_folder(path.parent):
            return _hf_checkpoint(path.parent)
        raise ValueError(f"{path} holds transformers weights; give the folder with its config.json")
    if any(k.endswith("storage_tokens") for k in state):
        raise ValueError(f"{path} holds DINOv3 weights (its storage tokens); a DINOv3 is read with backbone kind: "
                         "dinov3 (as an embedder or evaluation reference), not as a DINOv2")  # fmt: skip
    parts = _split(state)
    backbone = parts.pop("backbone")
    sidecar = read_sidecar(path) or {}
    recorded = sidecar.get("lvd_backbone")
    if is_timm_state(backbone):
        backbone, kwargs = from_timm_state(backbone, recorded, arch)
        return Checkpoint(backbone, kwargs, "timm", sidecar.get("image_size"), parts)
    backbone = {_CHUNKED.sub(r"blocks.\2.", k): v for k, v in backbone.items()}  # block chunks: flat indices
    return Checkpoint(backbone, recorded, "official", sidecar.get("image_size"), parts)


_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _select_model(state: Mapping[str, Any]) -> dict[str, Any]:
    """Wrapper names removed (DDP `module.`, FSDP, activation checkpointing, torch.compile); of a checkpoint holding
    the whole SSL model (`teacher.*` and `student.*`), the teacher: what the reference evaluates and releases."""
    clean = {}
    for k, v in state.items():
        for w in _WRAPPERS:
            k = k.replace(w, "")
        clean[k.removeprefix("module.")] = v
    for model in ("teacher.", "student."):
        if any(k.startswith(model) for k in clean):
            return {k[len(model):]: v for k, v in clean.items() if k.startswith(model)}
    return clean


def _split(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{"backbone": ..., "dino_head": ..., "ibot_head": ...} by prefix; without `backbone.` keys, everything that
    is not a head is the backbone."""
    heads = {h: {k[len(h) + 1:]: v for k, v in state.items() if k.startswith(h + ".")} for h in HEADS}
    prefixed = any(k.startswith("backbone.") for k in state)
    backbone = {k.removeprefix("backbone."): v for k, v in state.items()
                if (k.startswith("backbone.") if prefixed else not k.startswith(tuple(f"{h}." for h in HEADS)))}
    return {"backbone": backbone, **{h: sd for h, sd in heads.items() if sd}}


def read_backbone_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Official-named backbone tensors and, where the file records it, the architecture."""
    ck = read_checkpoint(path)
    return ck.backbone, ck.arch


def recorded_image_size(path: Path | str) -> int | None:
    """The resolution a checkpoint records (project exports, sidecars, transformers folders) without reading its
    tensors; None when it records none (a plain official or timm state dict)."""
    path = hub_snapshot(path)
    if path.is_dir():
        if is_timm_folder(path):
            return timm_folder_image_size(path)
        return read_hf_image_size(path) if is_hf_folder(path) else None
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        if "lvd_backbone" in meta:
            return int(json.loads(meta["lvd_backbone"])["img_size"])
    sidecar = read_sidecar(path)
    return int(sidecar["image_size"]) if sidecar and "image_size" in sidecar else None


def load_backbone(path: Path | str, arch: str | None = None, **overrides: Any) -> DinoVisionTransformer:
    """A backbone from any checkpoint `read_checkpoint` reads (strict key match).

    Where the file records no architecture it is inferred from the tensor shapes; `arch` (a registry name) pins the
    head count and `overrides` set anything else (e.g. `interpolate_offset`, `interpolate_antialias`).
    """
    ck = read_checkpoint(Path(path), arch)
    kwargs = ck.arch
    if kwargs is None:
        kwargs = infer_arch_kwargs(ck.backbone)
        if arch is not None:
            kwargs["num_heads"] = ARCHS[arch]["num_heads"]
    backbone = DinoVisionTransformer(**{**kwargs, **{k: v for k, v in overrides.items() if v is not None}})
    load_official_state_dict(backbone, ck.backbone, strict=True)
    return backbone.eval()
