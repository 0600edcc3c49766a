"""Hugging Face transformers format, both ways: a folder that `AutoModel.from_pretrained(folder)` loads offline as
`Dinov2Model` or `Dinov2WithRegistersModel` (`config.json`, `model.safetensors`, `preprocessor_config.json`), and
such a folder (written here, by `save_pretrained`, or downloaded from the hub) read back as a DINOv2 backbone.

Weights are written under the key names of the hub's `facebook/dinov2-*` checkpoints (`attention.attention.query`,
`mlp.weights_in`, ...), which transformers 4.x loads as they are and 5.x converts on load; both those names and
5.x's own (`attention.q_proj`, `mlp.gate_proj`, ...) are read. Parts that transformers' DINOv2 always has and a
backbone may not are written as the identity: zero biases, LayerScale of ones.

Position embeddings at another resolution than the exported one: transformers interpolates with an output size
(offset 0), without antialias in `Dinov2Model` and with it in `Dinov2WithRegistersModel`; a backbone trained with the
reference's 0.1 offset gives the same features at its own resolution and slightly different ones elsewhere
(`HFExport.exact_interpolation`). An import carries the transformers class's convention.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from infra.hub import WEIGHTS, folder_weights
from infra.storage import atomic_path, atomic_write_text

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# model_type -> (class, interpolate_offset, interpolate_antialias) as transformers computes them
CLASSES = {"dinov2": ("Dinov2Model", 0.0, False), "dinov2_with_registers": ("Dinov2WithRegistersModel", 0.0, True)}
_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# block-relative official name -> hub name (the fused qkv and the SwiGLU packing are handled apart)
_BLOCK = {"norm1": "norm1", "attn.proj": "attention.output.dense", "ls1.gamma": "layer_scale1.lambda1",
          "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.w12": "mlp.weights_in",
          "mlp.w3": "mlp.weights_out", "ls2.gamma": "layer_scale2.lambda1"}
_TOP = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings", "register_tokens": "embeddings.register_tokens",
        "patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
# transformers 5.x names -> hub names
_V5 = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
       "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
       "mlp.down_proj": "mlp.weights_out"}


@dataclass(frozen=True)
class HFExport:
    folder: Path
    model_type: str
    exact_interpolation: bool  # transformers interpolates position embeddings as the backbone does


def model_type_for(arch: dict[str, Any]) -> str:
    """`dinov2_with_registers` for registers or the offset-0 + antialias convention, else `dinov2`."""
    if arch["num_register_tokens"] or (arch["interpolate_offset"] == 0 and arch["interpolate_antialias"]):
        return "dinov2_with_registers"
    return "dinov2"


def exact_interpolation(arch: dict[str, Any], model_type: str) -> bool:
    _, offset, antialias = CLASSES[model_type]
    return arch["interpolate_offset"] == offset and bool(arch["interpolate_antialias"]) == antialias


def hf_config(arch: dict[str, Any], model_type: str) -> dict[str, Any]:
    ratio = arch["mlp_ratio"]
    if float(ratio) != int(ratio):
        raise ValueError(f"transformers' DINOv2 takes an integer mlp_ratio; this backbone has {ratio}")
    config = {
        "architectures": [CLASSES[model_type][0]], "model_type": model_type,
        "hidden_size": arch["embed_dim"], "num_hidden_layers": arch["depth"],
        "num_attention_heads": arch["num_heads"], "mlp_ratio": int(ratio), "hidden_act": "gelu",
        "layer_norm_eps": 1e-6, "image_size": arch["img_size"], "patch_size": arch["patch_size"],
        "num_channels": arch["in_chans"], "qkv_bias": bool(arch["qkv_bias"]), "layerscale_value": 1.0,
        "use_swiglu_ffn": arch["ffn_layer"] in ("swiglu", "swiglufused"), "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
    }
    if model_type == "dinov2_with_registers":
        config["num_register_tokens"] = arch["num_register_tokens"]
    if arch["ffn_layer"] == "identity":
        raise ValueError("transformers' DINOv2 has no identity FFN")
    return config


def preprocessor_config(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict[str, Any]:
    """This project's evaluation transform (`infra.features.eval_transform`): shorter side to `image_size`
    (bicubic), centre crop, ImageNet normalisation."""
    return {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean),
            "image_std": list(std), "do_convert_rgb": True}


def to_hf_state(state: dict[str, torch.Tensor], arch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Official key names -> the hub's transformers names; missing biases and LayerScale become the identity."""
    d = arch["embed_dim"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _LAYER.match(key)
        if m is None:
            stem, _, leaf = key.rpartition(".") if key.startswith(("patch_embed", "norm.")) else (key, "", "")
            out[_TOP[stem] + (f".{leaf}" if leaf else "")] = value
            continue
        i, rest = m[1], m[2]
        if rest.startswith("attn.qkv."):
            leaf = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.split(d), strict=True):
                out[f"encoder.layer.{i}.attention.attention.{name}.{leaf}"] = part.contiguous()
            continue
        stem, leaf = (rest, "") if rest.endswith("gamma") else rest.rsplit(".", 1)
        out[f"encoder.layer.{i}.{_BLOCK[stem]}" + (f".{leaf}" if leaf else "")] = value
    for i in range(arch["depth"]):
        _identity_parts(out, f"encoder.layer.{i}.", d)
    if "embeddings.mask_token" not in out:
        out["embeddings.mask_token"] = torch.zeros(1, d)
    return out


def _identity_parts(out: dict[str, torch.Tensor], p: str, d: int) -> None:
    for ls in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
        out.setdefault(p + ls, torch.ones(d))
    out.setdefault(p + "attention.output.dense.bias", torch.zeros(d))
    for lin in ("mlp.fc1", "mlp.fc2", "mlp.weights_in", "mlp.weights_out"):
        if p + lin + ".weight" in out:
            out.setdefault(p + lin + ".bias", torch.zeros(out[p + lin + ".weight"].shape[0]))


def write_hf(state: dict[str, torch.Tensor], arch: dict[str, Any], folder: Path,
             mean=IMAGENET_MEAN, std=IMAGENET_STD) -> HFExport:
    """Write `folder/{config.json, model.safetensors, preprocessor_config.json}` (fp32, as trained)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_type = model_type_for(arch)
    tensors = to_hf_state(state, arch)
    if model_type == "dinov2_with_registers" and not arch["num_register_tokens"]:  # the registers class, none of them
        tensors["embeddings.register_tokens"] = torch.zeros(1, 0, arch["embed_dim"])
    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(folder / "config.json", json.dumps(hf_config(arch, model_type), indent=2) + "\n")
    atomic_write_text(folder / "preprocessor_config.json",
                      json.dumps(preprocessor_config(arch["img_size"], mean, std), indent=2) + "\n")
    return HFExport(folder, model_type, exact_interpolation(arch, model_type))


# --- import -------------------------------------------------------------------------------------------------------
def is_hf_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def read_hf(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """(official-named state, architecture with the transformers class's interpolation, evaluation size)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in CLASSES:
        hint = ": a DINOv3, read with backbone kind: dinov3" if model_type == "dinov3_vit" else ""
        raise ValueError(f"{folder}: model_type {model_type!r} is not a DINOv2 ({sorted(CLASSES)}){hint}")
    if config.get("hidden_act", "gelu") != "gelu" or config.get("layer_norm_eps", 1e-6) != 1e-6:
        raise ValueError(f"{folder}: only hidden_act=gelu and layer_norm_eps=1e-6 are read (the DINOv2 values)")
    state = from_hf_state(folder_weights(folder), config)
    return state, hf_arch(config, state), read_hf_image_size(folder)


def read_hf_image_size(folder: Path) -> int:
    """The image processor's crop (what the folder's users feed the model), else the config's image size."""
    pre = Path(folder) / "preprocessor_config.json"
    crop = json.loads(pre.read_text()).get("crop_size") if pre.is_file() else None
    if isinstance(crop, dict) and "height" in crop:
        return int(crop["height"])
    size = json.loads((Path(folder) / "config.json").read_text()).get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])


def hf_arch(config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    _, offset, antialias = CLASSES[config["model_type"]]
    size = config.get("image_size", 224)
    patch = config.get("patch_size", 14)
    return {
        "img_size": size if isinstance(size, int) else size[0], "patch_size": patch if isinstance(patch, int) else patch[0],
        "in_chans": config.get("num_channels", 3), "embed_dim": config["hidden_size"],
        "depth": config["num_hidden_layers"], "num_heads": config["num_attention_heads"],
        "mlp_ratio": float(config.get("mlp_ratio", 4)), "qkv_bias": config.get("qkv_bias", True),
        "ffn_bias": True, "proj_bias": True, "init_values": 1.0 if "blocks.0.ls1.gamma" in state else None,
        "ffn_layer": "swiglufused" if config.get("use_swiglu_ffn") else "mlp",
        "num_register_tokens": config.get("num_register_tokens", 0) if config["model_type"] != "dinov2" else 0,
        "interpolate_offset": offset, "interpolate_antialias": antialias,
    }


def from_hf_state(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HF names (hub or 5.x, with or without a `dinov2.` prefix) -> official names. LayerScale of exactly ones
    (what an export of a backbone without LayerScale holds) is dropped."""
    hub = _to_hub_names({k.removeprefix("dinov2."): v for k, v in tensors.items() if not k.startswith("classifier.")})
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hub.items():
        m = _HF_LAYER.match(key)
        if m is None:
            stem, _, leaf = key.rpartition(".") if key.startswith(("embeddings.patch", "layernorm")) else (key, "", "")
            if stem not in top:
                raise ValueError(f"unexpected key {key!r} in a DINOv2 transformers checkpoint")
            out[top[stem] + (f".{leaf}" if leaf else "")] = value
            continue
        i, rest = m[1], m[2]
        qm = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if qm:
            qkv.setdefault((i, qm[2]), {})[qm[1]] = value
            continue
        stem, leaf = (rest, "") if rest.endswith("lambda1") else rest.rsplit(".", 1)
        if stem not in block:
            raise ValueError(f"unexpected key {key!r} in a DINOv2 transformers checkpoint")
        out[f"blocks.{i}.{block[stem]}" + (f".{leaf}" if leaf else "")] = value
    for (i, leaf), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    if "register_tokens" in out and not out["register_tokens"].numel():  # the registers class without registers
        del out["register_tokens"]
    if not config.get("use_mask_token", True) or "mask_token" not in out:
        out["mask_token"] = torch.zeros(1, config["hidden_size"])
    gammas = [v for k, v in out.items() if k.endswith("gamma")]
    if gammas and all(bool((g == 1).all()) for g in gammas):
        out = {k: v for k, v in out.items() if not k.endswith("gamma")}
    return out


def _to_hub_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.x names -> hub names (gate_proj + up_proj are packed back into weights_in)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if ".mlp.up_proj." in key:
            continue
        if ".mlp.gate_proj." in key:
            up = tensors[key.replace("gate_proj", "up_proj")]
            out[key.replace("gate_proj", "weights_in")] = torch.cat([value, up])
            continue
        for new, old in _V5.items():
            key = key.replace(f".{new}.", f".{old}.")
        out[key] = value
    return out
