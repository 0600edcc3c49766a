"""SSCD copy-detection model (Pizzi et al., CVPR 2022), the descriptor DINOv2 dedups with (paper §A.3).

The in-project model mirrors the released torchvision variant exactly: a torchvision ResNet built with
``num_classes=dims`` and ``zero_init_residual=True`` whose ``avgpool`` is replaced by GeM pooling (p=3), so its
``fc`` is the linear projection 2048 -> 512; an L2 normalisation follows. Its state-dict keys are therefore
``backbone.<torchvision resnet key>``, the layout of ``sscd_*.torchvision.pt``.

Loaders for the official release formats, from a local path:

- ``*.torchscript.pt``: a standalone TorchScript module (``torch.jit.load``);
- ``*.torchvision.pt``: a state dict for the model above (with or without the ``backbone.`` prefix);
- ``*.onnx``: an ONNX export, run with onnxruntime, in either layout published SSCD exports use, read from the
  model's input signature (:func:`onnx_input`): ``float_nchw`` (B, 3, H, W) float32 ImageNet-normalised, as
  ``export_onnx`` writes; or ``uint8_nhwc`` (B, H, W, 3) RGB 0-255 with the normalisation inside the graph (e.g. the
  int8 export of ``sscd_disc_mixup`` shipped on PyPI: Cast, Sub mean x 255, Div std x 255, Transpose). Height and
  width may be free or fixed. ``dedup.descriptor.input`` names the layout where the signature does not tell.

Every loaded model maps a normalised (B, 3, H, W) float tensor to (B, dims) L2-normalised descriptors (an ONNX model
of another layout gets the same pixels in its own layout).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from infra.features import IMAGENET_MEAN, IMAGENET_STD
from infra.storage import atomic_path

TRUNKS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "resnext101_32x8d": torchvision.models.resnext101_32x8d,
}
FORMATS = ("torchscript", "torchvision", "onnx")
LAYOUTS = ("float_nchw", "float_nhwc", "uint8_nchw", "uint8_nhwc")  # float: ImageNet-normalised; uint8: RGB 0-255
_ELEMENT = {"tensor(float)": "float", "tensor(uint8)": "uint8"}
_WRAPPERS = ("module.", "model.", "_orig_mod.")


class GeM(nn.Module):
    """Generalised-mean pooling over H x W: (mean(clamp(x, 1e-6)^p))^(1/p); (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).clamp(min=1e-6).pow(self.p).mean(dim=2).pow(1.0 / self.p)


class L2Norm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class SSCDModel(nn.Module):
    """ResNet trunk + GeM (p=3) + Linear(2048, dims) + L2 norm (SSCD ``Model("TV_RESNET50", 512, 3.0)``)."""

    def __init__(self, arch: str = "resnet50", dims: int = 512, pool_param: float = 3.0):
        super().__init__()
        if arch not in TRUNKS:
            raise ValueError(f"unknown SSCD trunk {arch!r}; one of {sorted(TRUNKS)}")
        self.arch, self.dims, self.pool_param = arch, dims, pool_param
        self.backbone = TRUNKS[arch](weights=None, num_classes=dims, zero_init_residual=True)
        if pool_param > 1:
            self.backbone.avgpool = GeM(pool_param)
            nn.init.xavier_uniform_(self.backbone.fc.weight)
            nn.init.zeros_(self.backbone.fc.bias)
        self.embeddings = L2Norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embeddings(self.backbone(x))


@dataclass(frozen=True)
class OnnxInput:
    """What an ONNX model's first input asks for: its name, layout and fixed height/width (None: free)."""

    name: str
    layout: str  # one of LAYOUTS
    height: int | None
    width: int | None


def _channels(shape: list) -> str | None:
    """"first" (B, 3, H, W), "last" (B, H, W, 3), or None where the shape does not tell."""
    first, last = shape[1] == 3, shape[3] == 3
    return "first" if first and not last else "last" if last and not first else None


def onnx_input(session, layout: str = "auto") -> OnnxInput:
    """The input layout of an SSCD ONNX model from its signature (element type, rank, channel position), or the
    ``layout`` asked for, checked against the signature."""
    inp = session.get_inputs()[0]
    shape = list(inp.shape)
    if len(shape) != 4:
        raise ValueError(f"the model's input {inp.name!r} has shape {shape}; an SSCD image model takes 4 dimensions")
    element = _ELEMENT.get(inp.type)
    if element is None:
        raise ValueError(f"the model's input {inp.name!r} is {inp.type}; supported: float32 or uint8 images")
    channels = _channels(shape)
    if layout == "auto":
        if channels is None:
            raise ValueError(f"the model's input {inp.name!r} has shape {shape}: the channel position is ambiguous; "
                             f"set dedup.descriptor.input to {element}_nchw or {element}_nhwc")  # fmt: skip
        layout = f"{element}_{'nchw' if channels == 'first' else 'nhwc'}"
    if layout not in LAYOUTS:
        raise ValueError(f"unknown input layout {layout!r}; one of {LAYOUTS}")
    wanted_channels = "first" if layout.endswith("nchw") else "last"
    if not layout.startswith(element) or (channels is not None and channels != wanted_channels):
        raise ValueError(f"dedup.descriptor.input={layout}, but the model's input {inp.name!r} is {inp.type} of "
                         f"shape {shape}")  # fmt: skip
    h, w = (shape[2], shape[3]) if wanted_channels == "first" else (shape[1], shape[2])
    return OnnxInput(inp.name, layout, h if isinstance(h, int) else None, w if isinstance(w, int) else None)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (B, 3, H, W) -> the RGB 0-255 uint8 (B, H, W, 3) it was made from (exact: rounding)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    pixels = ((x.detach().float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


class OnnxModel(nn.Module):
    """An ONNX export run by onnxruntime behind the same tensor-in, tensor-out interface, in the layout it asks for."""

    def __init__(self, path: Path, providers: list[str] | None = None, layout: str = "auto", threads: int = 0):
        super().__init__()
        import onnxruntime as ort

        from infra.cpus import cpus

        opts = ort.SessionOptions()
        # 0: one per CPU this process may use (onnxruntime's own 0 is one per core of the host, quota or not)
        opts.intra_op_num_threads = threads or cpus()
        opts.inter_op_num_threads = 1
        available = ort.get_available_providers()
        wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), sess_options=opts,
                                            providers=[p for p in wanted if p in available])  # fmt: skip
        self.input = onnx_input(self.session, layout)
        self.input_name = self.input.name
        out = self.session.get_outputs()[0].shape
        self.dims = out[-1] if len(out) == 2 and isinstance(out[-1], int) else None  # None: known once run

    def feed(self, x: torch.Tensor) -> np.ndarray:
        """The model's input for a normalised (B, 3, H, W) batch."""
        if self.input.layout.startswith("uint8"):
            arr = to_pixels(x)  # B, H, W, 3
            return np.ascontiguousarray(arr.transpose(0, 3, 1, 2) if self.input.layout.endswith("nchw") else arr)
        arr = x.detach().float().cpu().numpy()  # B, 3, H, W
        return np.ascontiguousarray(arr if self.input.layout.endswith("nchw") else arr.transpose(0, 2, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: self.feed(x)})[0]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def detect_format(path: Path) -> str:
    name = Path(path).name.lower()
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith(".torchscript.pt"):
        return "torchscript"
    if name.endswith((".torchvision.pt", ".pth", ".pt", ".safetensors")):
        return "torchvision"
    raise ValueError(f"{path}: cannot tell the SSCD format from the name; set dedup.descriptor.format")


def sscd_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Model keys (``backbone.*``) from a released or re-saved state dict (Lightning/DDP wrappers removed)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    out = {}
    for key, value in obj.items():
        for prefix in _WRAPPERS:
            key = key.removeprefix(prefix)
        out[key if key.startswith("backbone.") else f"backbone.{key}"] = value
    return out


def _read_state(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_sscd(path: Path | str, fmt: str = "auto", arch: str = "resnet50", dims: int = 512, layout: str = "auto",
              threads: int = 0) -> nn.Module:  # fmt: skip
    """An SSCD model from a local file in one of the official formats, in eval mode. ``layout`` and ``threads``
    apply to ONNX files (the input layout, see :func:`onnx_input`, and onnxruntime's intra-op threads)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SSCD model file not found: {path}. Fetch the official files with `lvd models fetch sscd_disc_mixup` "
            "(needs internet) or set dedup.descriptor.backend=pixel"
        )
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "torchscript":
        model: nn.Module = torch.jit.load(str(path), map_location="cpu")
    elif fmt == "torchvision":
        model = SSCDModel(arch, dims)
        model.load_state_dict(sscd_state_dict(_read_state(path)), strict=True)
    elif fmt == "onnx":
        model = OnnxModel(path, layout=layout, threads=threads)
    else:
        raise ValueError(f"unknown SSCD format {fmt!r}; one of {FORMATS}")
    return model.eval()


def export_torchscript(model: nn.Module, path: Path | str) -> Path:
    """A standalone TorchScript file, like the released ``*.torchscript.pt``."""
    scripted = torch.jit.script(model.eval())
    with atomic_path(path) as tmp:
        scripted.save(str(tmp))
    return Path(path)


def export_torchvision(model: SSCDModel, path: Path | str) -> Path:
    """The state dict with the released ``*.torchvision.pt`` key layout."""
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    return Path(path)


def export_onnx(model: nn.Module, path: Path | str, image_size: int = 320, opset: int = 17) -> Path:
    """ONNX with dynamic batch and spatial size (needs the ``onnx`` package: ``pip install onnx``)."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError as err:
        raise ImportError("exporting ONNX needs the `onnx` package: pip install onnx") from err
    dummy = torch.zeros(1, 3, image_size, image_size)
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "descriptors": {0: "batch"}}
    with atomic_path(path) as tmp:
        torch.onnx.export(model.eval(), (dummy,), str(tmp), input_names=["images"], output_names=["descriptors"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)  # fmt: skip
    return Path(path)
