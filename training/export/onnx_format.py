"""`onnx`: the backbone as an ONNX graph, for onnxruntime, TensorRT, OpenVINO or Triton, where no Python model code
runs. One of the most asked-for DINOv2 exports; the official repository has no exporter.

The graph takes `pixel_values` (float32 [batch, 3, S, S], RGB scaled to 0-1 and normalised with the ImageNet mean and
std, as `lvd evaluate` and the transformers processor prepare it) and returns `cls_token` [batch, D] and
`patch_tokens` [batch, (S / patch)^2, D] (the final norm applied: DINOv2's `x_norm_clstoken` and
`x_norm_patchtokens`), plus `register_tokens` [batch, R, D] for a model with registers. The batch is free; the
resolution S is fixed when the graph is made (the position embeddings are resized for S at export time, by this
project's own resizing, so the graph computes what `lvd evaluate` computes at S): export once per resolution you serve.

The export is checked before it is kept: onnxruntime runs the graph on a batch of two random images and every output
must equal this project's fp32 forward to `TOLERANCE` (measured: ~1e-6); otherwise the file is not written and the
error says by how much they differ. The sidecar `<file>.json` records the architecture, S, the inputs and outputs, the
normalisation and the measured difference.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.features import IMAGENET_MEAN, IMAGENET_STD
from infra.storage import atomic_path, atomic_write_text
from training.vision_transformer import DinoVisionTransformer

OPSET = 17  # LayerNormalization is a single op from 17 on (onnxruntime >= 1.14, TensorRT >= 8.6)
TOLERANCE = 1e-4  # largest |onnxruntime - torch| accepted on any output, fp32


class ExportMismatch(RuntimeError):
    """The exported graph does not compute what the model computes."""


class _Tokens(torch.nn.Module):
    """The backbone's normalised class, register and patch tokens as a tuple (what an ONNX graph returns)."""

    def __init__(self, backbone: DinoVisionTransformer):
        super().__init__()
        self.backbone = backbone
        self.registers = backbone.arch_kwargs.get("num_register_tokens", 0)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backbone.forward_features(pixel_values)
        tokens = (out["x_norm_clstoken"], out["x_norm_patchtokens"])
        return (*tokens, out["x_norm_regtokens"]) if self.registers else tokens


def at_resolution(backbone: DinoVisionTransformer, image_size: int) -> DinoVisionTransformer:
    """An fp32 copy of `backbone` whose position embeddings are already resized to `image_size` (by its own
    `interpolate_pos_encoding`, run here): traced, the resizing would be recorded with the sizes of the trace, and
    the TorchScript exporter cannot record bicubic resizing by a scale factor (the reference's 0.1 offset) at all."""
    twin = copy.deepcopy(backbone).float().eval()
    n = (image_size // twin.patch_size) ** 2
    with torch.no_grad():
        resized = twin.interpolate_pos_encoding(torch.zeros(1, 1 + n, twin.embed_dim), image_size, image_size)
    twin.pos_embed = torch.nn.Parameter(resized.clone(), requires_grad=False)
    return twin


def output_names(registers: int) -> list[str]:
    return ["cls_token", "patch_tokens", *(["register_tokens"] if registers else [])]


def write_onnx(backbone: DinoVisionTransformer, dest: Path, image_size: int) -> tuple[Path, float]:
    """Write `dest` (+ `dest.json`); the largest difference from the torch forward, measured on the written graph."""
    patch = backbone.arch_kwargs["patch_size"]
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    model = _Tokens(at_resolution(backbone, image_size))
    names = output_names(model.registers)
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    axes = {n: {0: "batch"} for n in ["pixel_values", *names]}
    with atomic_path(dest) as tmp:
        # The tracer warns of every Python value it records as a constant (the shapes): the graph is made for one
        # resolution on purpose, and `_check` compares what it computes.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, (example,), str(tmp), input_names=["pixel_values"], output_names=names,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)  # fmt: skip
            expected = [t.numpy() for t in model(example)]
        diff = _check(tmp, example.numpy(), expected, names)
    atomic_write_text(dest.with_name(dest.name + ".json"), json.dumps(sidecar(backbone, image_size, names, diff),
                                                                      indent=2) + "\n")  # fmt: skip
    return dest, diff


def _check(path: Path, x: np.ndarray, expected: list[np.ndarray], names: list[str]) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(names, {"pixel_values": x})
    diffs = {n: float(np.abs(g - e).max()) for n, g, e in zip(names, got, expected, strict=True)}
    if max(diffs.values()) > TOLERANCE:
        raise ExportMismatch(f"the ONNX graph differs from the model by up to {max(diffs.values()):.2e} "
                             f"(tolerance {TOLERANCE:g}; per output: {diffs}); nothing was written")
    return max(diffs.values())


def sidecar(backbone: DinoVisionTransformer, image_size: int, names: list[str], diff: float) -> dict[str, Any]:
    arch = dict(backbone.arch_kwargs)
    n, d = (image_size // arch["patch_size"]) ** 2, backbone.embed_dim
    shapes = {"cls_token": ["batch", d], "patch_tokens": ["batch", n, d],
              "register_tokens": ["batch", arch.get("num_register_tokens", 0), d]}
    return {"format": "lvd-onnx", "image_size": image_size, "opset": OPSET, "lvd_backbone": arch,
            "inputs": {"pixel_values": ["batch", 3, image_size, image_size]},
            "outputs": {k: shapes[k] for k in names},
            "preprocessing": {"resize": f"shorter side to {image_size} px, bicubic, then a centre crop",
                              "scale": "RGB / 255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "max_abs_diff_vs_torch_fp32": diff}


def onnx_usage(dest: Path, image_size: int, registers: int) -> str:
    """Python that runs the graph on a photograph, prepared as `lvd evaluate` prepares it (EXIF orientation applied,
    then `infra.features.eval_transform`: shorter side to S, bicubic, centre crop, ImageNet normalisation)."""
    outputs = "cls_token, patch_tokens" + (", register_tokens" if registers else "")
    s = image_size
    return (f'import numpy as np, onnxruntime as ort\nfrom PIL import Image, ImageOps\n'
            f'session = ort.InferenceSession("{dest}")\n'
            f'img = ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB")  # upright, as lvd reads photos\n'
            f"k = {s} / min(img.size)\n"
            f"img = img.resize((max({s}, round(img.width * k)), max({s}, round(img.height * k))), Image.BICUBIC)\n"
            f"left, top = (img.width - {s}) // 2, (img.height - {s}) // 2\n"
            f"x = np.asarray(img.crop((left, top, left + {s}, top + {s})), np.float32) / 255\n"
            f"x = (x - np.float32({list(IMAGENET_MEAN)})) / np.float32({list(IMAGENET_STD)})\n"
            f'{outputs} = session.run(None, {{"pixel_values": x.transpose(2, 0, 1)[None]}})')
