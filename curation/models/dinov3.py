"""DINOv3 backbones (Siméoni et al. 2025, arXiv 2508.10104) from the files as they are published, for embedding
(retrieval and rebalancing work in the embedder's feature space) and as evaluation references.

The layout is read from the file, not its name:

- Meta's release (``dinov3_vits16_pretrain_lvd1689m-08c60483.pth``, the weights of the official repository's
  ``torch.hub`` entries): ``storage_tokens``, ``blocks.N.attn.qkv`` with a ``bias_mask``, ``ls1.gamma``,
  ``rope_embed.periods``; a training checkpoint's ``teacher.backbone.`` (or DDP / FSDP) prefixes are removed;
- a transformers folder (``facebook/dinov3-vits16-pretrain-lvd1689m``: ``DINOv3ViTModel``, ``model_type``
  ``dinov3_vit``), or a Hugging Face cache folder holding one;
- timm's (``timm/vit_small_patch16_dinov3.lvd1689m``: a hub folder, or its state dict as a file).

The network is timm's implementation (``timm.models.eva``, the ``vit_*_patch16_dinov3`` family), built with the
sizes read from the tensors (width, depth, heads, patch, storage tokens, MLP or SwiGLU and its width, q/v biases), so
fine-tuned and non-standard sizes load too. Meta's names become timm's through timm's own converter
(``checkpoint_filter_fn``); transformers' become Meta's here (:func:`meta_from_hf`). Its output is DINOv3's global
descriptor: the class token after the final norm (Meta's ``x_norm_clstoken``, transformers' ``pooler_output``).
timm's own default for these models pools the patch tokens' mean instead, which is not the released descriptor.

Not read: the 7B model's separate class-token norms (``cls_norm``), and weights trained with other input statistics
than ImageNet's (the satellite SAT-493M models): lvd normalises images with the ImageNet mean and std, so a
transformers folder whose image processor says otherwise is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from infra.features import IMAGENET_MEAN, IMAGENET_STD

HEAD_DIM = 64  # every published DINOv3 ViT (S, S+, B, L, H+, 7B): width / heads
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_WRAPPERS = ("module.", "_orig_mod.", "teacher.", "backbone.")


@dataclass(frozen=True)
class Dinov3Arch:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    storage_tokens: int
    swiglu: bool
    hidden: int  # MLP hidden width (SwiGLU: of each of its two input projections)
    qkv_bias: bool  # q and v biases (k's is masked to zero in Meta's model)
    layerscale: bool

    def describe(self) -> str:
        return (f"DINOv3 ViT {self.embed_dim}-dim x {self.depth} blocks x {self.num_heads} heads, patch "
                f"{self.patch_size}, {self.storage_tokens} storage tokens, {'SwiGLU' if self.swiglu else 'MLP'} "
                f"{self.hidden}")  # fmt: skip


def is_dinov3(path: Path | str) -> bool:
    """Whether ``path`` holds DINOv3 weights in any layout read here (cheap: a folder's config, a file's key names)."""
    from infra.hub import hub_snapshot

    try:
        return _layout(hub_snapshot(path)) is not None
    except (OSError, ValueError, RuntimeError):
        return False


def _layout(path: Path) -> str | None:
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            return None
        data = json.loads(config.read_text())
        if data.get("model_type") == "dinov3_vit":
            return "hf"
        return "timm" if "dinov3" in str(data.get("architecture", "")) and "model_type" not in data else None
    return _state_layout(_keys(path))


def _state_layout(keys: set[str]) -> str | None:
    if any(k.endswith("storage_tokens") for k in keys):
        return "meta"
    if "embeddings.cls_token" in keys and any(k.endswith("layer_scale1.lambda1") for k in keys):
        return "hf"
    if "reg_token" in keys and any(k.endswith("gamma_1") for k in keys) and "pos_embed" not in keys:
        return "timm"
    return None


def _keys(path: Path) -> set[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return set(f.keys())
    return set(_unwrap(_load(path)))


def _load(path: Path) -> dict[str, torch.Tensor]:
    from infra.hub import load_state

    obj = load_state(path, mmap=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict ({type(obj).__name__})")
    return obj


def _unwrap(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wrapper prefixes removed; of a whole SSL model, the backbone (heads left out)."""
    out = {}
    for k, v in state.items():
        for w in _WRAPPERS:
            k = k.removeprefix(w)
        if not k.startswith(("dino_head.", "ibot_head.", "student.")):
            out[k] = v
    return out


def read_dinov3(path: Path | str) -> tuple[dict[str, torch.Tensor], str, int | None]:
    """(tensors in Meta's or timm's names, layout ``meta`` / ``timm``, heads where the file records them)."""
    from infra.hub import hub_snapshot

    path = hub_snapshot(path)
    layout = _layout(path)
    if layout is None:
        raise ValueError(f"{path}: not a DINOv3 checkpoint (Meta's release .pth, a transformers DINOv3ViTModel folder, "
                         "or timm's vit_*_patch16_dinov3 weights)")  # fmt: skip
    if path.is_dir():
        from infra.hub import folder_weights

        config = json.loads((path / "config.json").read_text())
        state = folder_weights(path)
        if layout == "hf":
            _check_hf(path, config)
            return meta_from_hf(state), "meta", config.get("num_attention_heads")
        return state, "timm", (config.get("model_args") or {}).get("num_heads")
    state = _unwrap(_load(path))
    if layout == "hf":
        return meta_from_hf(state), "meta", None
    return state, layout, None


def _check_hf(folder: Path, config: Mapping) -> None:
    act = "silu" if config.get("use_gated_mlp") else "gelu"  # (timm's DINOv3: GELU MLP, SiLU-gated SwiGLU)
    if config.get("hidden_act", act) != act or config.get("layer_norm_eps", 1e-5) != 1e-5:
        raise ValueError(f"{folder}: hidden_act {config.get('hidden_act')!r} with use_gated_mlp "
                         f"{bool(config.get('use_gated_mlp'))} and layer_norm_eps {config.get('layer_norm_eps')}: "
                         f"the DINOv3 values ({act}, 1e-5) are read")  # fmt: skip
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = p.get("image_mean", IMAGENET_MEAN), p.get("image_std", IMAGENET_STD)
        if any(abs(a - b) > 1e-3 for a, b in zip([*mean, *std], [*IMAGENET_MEAN, *IMAGENET_STD], strict=True)):
            raise ValueError(f"{folder}: its images are normalised with mean {mean} and std {std} (e.g. the satellite "
                             "SAT-493M weights); lvd feeds models ImageNet-normalised images, which would not be what "
                             "this model was trained on")  # fmt: skip


def meta_from_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' DINOv3ViTModel names -> Meta's (separate q, k, v projections joined into ``qkv``, k's bias 0)."""
    out: dict[str, torch.Tensor] = {}
    rename = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "storage_tokens",
              "embeddings.mask_token": "mask_token", "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.bias": "patch_embed.proj.bias", "norm.weight": "norm.weight",
              "norm.bias": "norm.bias"}  # fmt: skip
    inner = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj", "layer_scale1.lambda1": "ls1.gamma",
             "layer_scale2.lambda1": "ls2.gamma", "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"}  # fmt: skip
    gated = any(k.endswith("mlp.gate_proj.weight") for k in state)
    if gated:  # SwiGLU: silu(w1 x) * w2 x, then w3
        inner.update({"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"})
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        k = k.removeprefix("model.") if k.startswith("model.layer.") else k
        if k in rename:
            out[rename[k]] = v.reshape(1, -1) if k == "embeddings.mask_token" else v
            continue
        m = re.match(r"^(?:model\.)?layer\.(\d+)\.(.+)$", k)
        if m is None:
            raise ValueError(f"unexpected key in a transformers DINOv3 state: {k}")
        i, rest = int(m[1]), m[2]
        if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            layers.setdefault(i, {})[rest] = v
            continue
        name, _, param = rest.rpartition(".")
        if name not in inner and rest not in inner:
            raise ValueError(f"unexpected key in a transformers DINOv3 state: {k}")
        out[f"blocks.{i}.{inner[rest]}" if rest in inner else f"blocks.{i}.{inner[name]}.{param}"] = v
    for i, qkv in layers.items():
        q, k_, v = (qkv[f"attention.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj"))
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k_, v])
        biases = [qkv.get(f"attention.{n}.bias") for n in ("q_proj", "k_proj", "v_proj")]
        if biases[0] is not None or biases[2] is not None:
            z = torch.zeros(q.shape[0], dtype=q.dtype)
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([b if b is not None else z for b in biases])
    return out


def arch_of(state: Mapping[str, torch.Tensor], layout: str, heads: int | None = None) -> Dinov3Arch:
    """The architecture, from the tensors' names and shapes (Meta's or timm's names)."""
    meta = layout == "meta"
    if "cls_norm.weight" in state:
        raise ValueError("a DINOv3 7B with its own class-token norm (cls_norm) is not read")
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(m[1]) for k in state if (m := _BLOCK.match(k)))
    tokens = state.get("storage_tokens" if meta else "reg_token")
    swiglu = f"blocks.0.mlp.{'w1' if meta else 'fc1_g'}.weight" in state
    hidden = state[f"blocks.0.mlp.{('w1' if meta else 'fc1_g') if swiglu else 'fc1'}.weight"].shape[0]
    if meta:
        biases = [state.get(f"blocks.{i}.attn.qkv.bias") for i in range(depth)]
        qkv_bias = any(b is not None and (b[:dim].any() or b[2 * dim :].any()) for b in biases)
    else:
        qkv_bias = "blocks.0.attn.q_bias" in state
    return Dinov3Arch(embed_dim=dim, depth=depth, num_heads=heads or max(1, dim // HEAD_DIM),
                      patch_size=state["patch_embed.proj.weight"].shape[-1],
                      storage_tokens=0 if tokens is None else tokens.shape[1], swiglu=swiglu, hidden=hidden,
                      qkv_bias=qkv_bias, layerscale=f"blocks.0.{'ls1.gamma' if meta else 'gamma_1'}" in state)  # fmt: skip


def timm_model(arch: Dinov3Arch) -> nn.Module:
    """timm's DINOv3 network with these sizes; its forward gives the class token after the final norm."""
    import timm

    name = ("vit_small_plus_patch16_dinov3" if arch.swiglu else "vit_small_patch16_dinov3") + (
        "_qkvb" if arch.qkv_bias else "")
    # timm's hidden width is int(width x mlp_ratio) (its SwiGLU with alignment 1: two separate input projections)
    sizes = {"mlp_ratio": (arch.hidden + 0.5) / arch.embed_dim, **({"swiglu_align_to": 1} if arch.swiglu else {})}
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="token", embed_dim=arch.embed_dim,
                             depth=arch.depth, num_heads=arch.num_heads, patch_size=arch.patch_size,
                             num_reg_tokens=arch.storage_tokens, init_values=1e-5 if arch.layerscale else None,
                             **sizes)  # fmt: skip


def load_dinov3(path: Path | str) -> nn.Module:
    """The backbone in eval mode, every weight of the file loaded (strict, apart from what Meta's model keeps for
    training only: the mask token, the RoPE periods buffer, the local-crop class-token norm)."""
    from timm.models.eva import checkpoint_filter_fn

    state, layout, heads = read_dinov3(path)
    arch = arch_of(state, layout, heads)
    model = timm_model(arch)
    if layout == "meta":
        if not arch.qkv_bias:  # zero q and v biases (k's is masked): the model without them (timm's converter
            state = {k: v for k, v in state.items() if not k.endswith("attn.qkv.bias")}  # prints an error per block)
        state = checkpoint_filter_fn(state, model)
    own = set(model.state_dict())  # (parameters and persistent buffers)
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit {arch.describe()}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")  # fmt: skip
    model.load_state_dict(state, strict=False)
    model.dinov3_arch = arch  # (what the file holds, for messages and fingerprints)
    return model.eval()
