"""`export_model(backbone, format, dest)`: one backbone written in one of `FORMATS`, with the line that loads it.

- `hf`: a folder for `transformers.AutoModel.from_pretrained` (+ a model card `README.md` when one is given);
- `timm`: a safetensors state dict for `timm.create_model(..., pretrained=True, pretrained_cfg_overlay={"file": ...})`
  and its sidecar `<file>.json` (the `create_model` call, the architecture, the resolution);
- `pth`: the official state dict (`torch.hub`'s DINOv2 builders load it strictly) and its sidecar;
- `safetensors`: this project's export (architecture in the metadata);
- `onnx`: an ONNX graph of the backbone at one resolution, checked against the torch forward (`onnx_format`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from infra.storage import atomic_path, atomic_write_text
from training.checkpoint import official_state_dict, save_safetensors, write_official_pth, write_sidecar
from training.export.hf import CLASSES, model_type_for, write_hf
from training.export.onnx_format import onnx_usage, write_onnx
from training.export.timm_format import INTERPOLATION, SIZES, timm_model, to_timm_state
from training.vision_transformer import DinoVisionTransformer

FORMATS = ("hf", "timm", "pth", "safetensors", "onnx")
HUB_DEFAULTS = {"img_size": 518, "patch_size": 14, "in_chans": 3, "mlp_ratio": 4.0, "qkv_bias": True, "ffn_bias": True,
                "proj_bias": True, "init_values": 1.0, "num_register_tokens": 0, "interpolate_offset": 0.1,
                "interpolate_antialias": False}  # torch.hub's dinov2_vit*14 builders


@dataclass
class Export:
    format: str
    path: Path  # the folder (hf) or the weights file
    usage: str  # the Python that loads it
    notes: list[str] = field(default_factory=list)  # where the library computes differently (interpolation)


def export_model(backbone: DinoVisionTransformer, fmt: str, dest: Path | str, card: str | None = None,
                 image_size: int | None = None) -> Export:
    """`image_size`: the resolution an `onnx` graph is made for (default: the model's own, `img_size`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {FORMATS}")
    dest = Path(dest)
    arch = dict(backbone.arch_kwargs)
    if fmt == "onnx":  # (traced from the module: no state dict)
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = image_size or arch["img_size"]
        _, diff = write_onnx(backbone, dest, size)
        return Export(fmt, dest, onnx_usage(dest, size, arch["num_register_tokens"]),
                      [f"the graph takes {size} x {size} px images (any batch); checked with onnxruntime: outputs "
                       f"within {diff:.1e} of the torch forward"])
    state = official_state_dict(backbone)
    if fmt == "hf":
        return _hf(state, arch, dest, card)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "timm":
        return _timm(state, arch, dest)
    if fmt == "pth":
        write_official_pth(state, arch, dest)
        return Export(fmt, dest, torch_usage(arch, dest))
    save_safetensors(state, dest, {"lvd_backbone": arch})
    return Export(fmt, dest, f'from training.checkpoint import load_backbone\nmodel = load_backbone("{dest}")')


def _hf(state: dict[str, Any], arch: dict[str, Any], dest: Path, card: str | None) -> Export:
    written = write_hf(state, arch, dest)
    if card is not None:
        atomic_write_text(dest / "README.md", card)
    return Export("hf", written.folder, hf_usage(dest), export_notes(arch, "hf"))


def hf_usage(folder: Path) -> str:
    return f'from transformers import AutoModel\nmodel = AutoModel.from_pretrained("{folder}")'


def export_notes(arch: dict[str, Any], fmt: str) -> list[str]:
    """Where the library computes differently from this project's forward: its position-embedding resizing."""
    if fmt == "hf":
        name, offset, antialias = CLASSES[model_type_for(arch)]
        library = f"transformers' {name}"
    elif fmt == "timm":
        library, (offset, antialias) = "timm", INTERPOLATION
    else:
        return []
    if (arch["interpolate_offset"], bool(arch["interpolate_antialias"])) == (offset, antialias):
        return []
    return [f"{library} resizes position embeddings with offset {offset:g} and antialias={antialias}; this model "
            f"was trained with offset {arch['interpolate_offset']:g} and antialias={bool(arch['interpolate_antialias'])}"
            f": the features are the same at {arch['img_size']} px (no resizing) and slightly different at other sizes"]


def _timm(state: dict[str, Any], arch: dict[str, Any], dest: Path) -> Export:
    name, kwargs = timm_model(arch)
    tensors = to_timm_state(state, arch)
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    call = {"model_name": name, "kwargs": kwargs, "pretrained_cfg_overlay": {"input_size": [arch["in_chans"],
                                                                                           arch["img_size"], arch["img_size"]]}}
    write_sidecar(dest, arch, layout="timm", timm=call)
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    usage = (f'import timm\nmodel = timm.create_model("{name}", pretrained=True{args}, pretrained_cfg_overlay='
             f'{{"file": "{dest}", "input_size": {tuple(call["pretrained_cfg_overlay"]["input_size"])}}})')
    return Export("timm", dest, usage, export_notes(arch, "timm"))


def torch_usage(arch: dict[str, Any], path: Path) -> str:
    """The official code's builder call that rebuilds this architecture: a `torch.hub` entry for the four released
    sizes, the official `DinoVisionTransformer` with the sidecar's arguments otherwise."""
    size = next((s[0] for s, dims in SIZES.items() if dims == (arch["embed_dim"], arch["depth"], arch["num_heads"])), None)
    swiglu = arch["ffn_layer"] in ("swiglu", "swiglufused")
    if size is None or swiglu != (size == "g"):
        return (f'import json, torch\nfrom dinov2.models.vision_transformer import DinoVisionTransformer\n'
                f'model = DinoVisionTransformer(block_chunks=0, **json.load(open("{path}.json"))["lvd_backbone"])\n'
                f'model.load_state_dict(torch.load("{path}"))')
    kwargs = {k: arch[k] for k, v in HUB_DEFAULTS.items() if arch[k] != v}
    if kwargs.get("init_values"):
        del kwargs["init_values"]  # any LayerScale: its values come from the weights
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (f'import torch\nmodel = torch.hub.load("facebookresearch/dinov2", "dinov2_vit{size}14", pretrained=False'
            f'{args})\nmodel.load_state_dict(torch.load("{path}"))')
