"""Copy-detection descriptors (paper §A.3 uses SSCD), query views and SSCD's descriptor post-processing.

- :class:`SSCDDescriptor` runs an SSCD model (any loaded format) with SSCD's preprocessing: squash to 320x320
  (batched) or short side to 288 with the aspect kept (batched by shape), ImageNet normalisation.
- :class:`PixelDescriptor` is a training-free baseline for the offline demo: grey pixels at 16x16, mean-centred.
- :func:`query_views`: centre crops at configured fractions, optionally mirrored. The index holds one descriptor
  per image; queries use every view and a pair's similarity is the max over views, which finds crops
  (a 7%-per-side crop of X matches X's 0.86 view) and mirror images.
- :class:`Whitener` (centring or PCA-whitening, then L2) and :func:`score_norm_offsets` follow SSCD's evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from infra.config.curation import DescriptorConfig
from infra.features import IMAGENET_MEAN, IMAGENET_STD
from infra.precision import resolve


class Descriptor(Protocol):
    name: str

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """(N, D) float32, L2-normalised."""
        ...


def l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


class PixelDescriptor:
    """Grey, resized, mean-centred pixels. No crop invariance of its own: use it with crop query views."""

    def __init__(self, size: int = 16):
        self.size = size
        self.name = f"pixel{size}"

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        s = self.size
        arr = np.stack([np.asarray(im.convert("L").resize((s, s), Image.BILINEAR), np.float32).ravel() for im in images])
        arr -= arr.mean(1, keepdims=True)
        return l2n(arr)


@dataclass
class SSCDDescriptor:
    model: torch.nn.Module
    name: str
    size: int = 320
    resize: str = "square"  # square: squash to size x size; short_side: shorter side to size
    batch_size: int = 64
    precision: str = "bf16"

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        if self.resize == "square":
            img = img.resize((self.size, self.size), Image.BILINEAR)
        else:  # torchvision Resize(288): the shorter side to 288, the other scaled (truncated) to keep the aspect
            w, h = img.size
            short, long_ = (w, h) if w <= h else (h, w)
            other = int(self.size * long_ / short)
            img = img.resize((self.size, other) if w <= h else (other, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> np.ndarray:
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve(self.precision, device.type) == "bf16" and not _is_onnx(self.model)):
            z = self.model(x.to(device))
        return l2n(z.float().cpu().numpy())

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        tensors = [self.preprocess(im) for im in images]
        out = np.zeros((len(images), 0), np.float32)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tensors):  # equal shapes batch together (always, for square)
            groups.setdefault(tuple(t.shape), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                part = idx[s : s + self.batch_size]
                z = self.forward(torch.stack([tensors[i] for i in part]))
                if out.shape[1] == 0:
                    out = np.zeros((len(images), z.shape[1]), np.float32)
                out[part] = z
        return out


def _is_onnx(model: torch.nn.Module) -> bool:
    return type(model).__name__ == "OnnxModel"


def build_descriptor(cfg: DescriptorConfig) -> Descriptor:
    if cfg.backend == "pixel":
        return PixelDescriptor(cfg.size)
    from curation.models.sscd import load_sscd

    if cfg.path is None:
        raise ValueError(
            "dedup.descriptor.path: the SSCD descriptor needs a local model file (*.torchscript.pt, "
            "*.torchvision.pt or *.onnx); `lvd models fetch sscd_disc_mixup` downloads the official one, or set "
            "dedup.descriptor.backend=pixel"
        )
    model = load_sscd(cfg.path, cfg.format, cfg.arch, cfg.dims, cfg.input, cfg.threads)
    if _is_onnx(model):
        check_fixed_size(model.input, cfg)
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)  # process-wide: the stage's cores go to this model
    if torch.cuda.is_available() and isinstance(model, torch.nn.Module) and not _is_onnx(model):
        model = model.cuda()
    name = f"sscd:{cfg.path.name}:{cfg.resize}{cfg.size}"
    return SSCDDescriptor(model, name, cfg.size, cfg.resize, cfg.batch_size, cfg.precision)


def check_fixed_size(inp, cfg: DescriptorConfig) -> None:
    """An ONNX model with a fixed height and width takes only square inputs of that size."""
    if inp.height is None and inp.width is None:
        return
    if (inp.height, inp.width) != (cfg.size, cfg.size) or cfg.resize != "square":
        raise ValueError(f"dedup.descriptor: the model takes {inp.height}x{inp.width} images only; set "
                         f"dedup.descriptor.resize=square and dedup.descriptor.image_size={inp.height or inp.width}")


def centre_crop(img: Image.Image, fraction: float) -> Image.Image:
    if fraction >= 1.0:
        return img
    w, h = img.size
    cw, ch = w * fraction, h * fraction
    left, top = (w - cw) / 2, (h - ch) / 2
    return img.crop((round(left), round(top), round(left + cw), round(top + ch)))


def query_views(img: Image.Image, fractions: list[float], flip: bool) -> list[Image.Image]:
    """The views a query is searched with: each centre crop, then (with ``flip``) each mirrored."""
    views = [centre_crop(img, f) for f in fractions]
    return views + [ImageOps.mirror(v) for v in views] if flip else views


def n_views(cfg: DescriptorConfig) -> int:
    return len(cfg.views) * (2 if cfg.flip else 1)


def describe(images: list[Image.Image], descriptor: Descriptor, cfg: DescriptorConfig) -> np.ndarray:
    """(N, V, D) descriptors of every query view; view 0 is the whole image (what the index holds)."""
    if not images:
        return np.zeros((0, n_views(cfg), 0), np.float32)
    views = [v for im in images for v in query_views(im, cfg.views, cfg.flip)]
    out = []
    for s in range(0, len(views), cfg.batch_size * 4):
        out.append(descriptor(views[s : s + cfg.batch_size * 4]))
    d = np.concatenate(out)
    return d.reshape(len(images), n_views(cfg), d.shape[-1])


@dataclass
class Whitener:
    """x -> L2(P (x - mean)): centring (P = I) or PCA-whitening (P = diag(1/sqrt(eig)) U^T), fitted on a sample."""

    mean: np.ndarray
    proj: np.ndarray  # (D, D_out)

    @classmethod
    def fit(cls, x: np.ndarray, mode: str, dim: int | None = None, eps: float = 1e-6) -> Whitener:
        x = np.asarray(x, np.float64)
        mean = x.mean(0)
        if mode == "center":
            return cls(mean.astype(np.float32), np.eye(x.shape[1], dtype=np.float32))
        cov = np.cov(x - mean, rowvar=False)
        eig, vec = np.linalg.eigh(cov)
        order = np.argsort(eig)[::-1][: dim or x.shape[1]]
        proj = vec[:, order] / np.sqrt(np.maximum(eig[order], 0) + eps)
        return cls(mean.astype(np.float32), proj.astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return l2n((np.asarray(x, np.float32) - self.mean) @ self.proj)


def score_norm_offsets(queries: np.ndarray, background: np.ndarray, ranks: tuple[int, int], beta: float,
                       block: int = 1 << 22) -> np.ndarray:  # fmt: skip
    """SSCD score normalisation: beta x mean similarity of each query to its ranks[0]..ranks[1] (inclusive) nearest
    background vectors; the offset is subtracted from every score of that query.

    Streams: queries and background in chunks whose score block holds at most ``block`` floats (16 MiB), keeping a
    running top-(ranks[1] + 1) per query by partial selection, so memory does not grow with either count.
    """
    q = np.asarray(queries, np.float32)
    k = ranks[1] + 1
    bg_rows = max(1, min(len(background), block // 64))
    q_rows = max(1, block // bg_rows)
    out = np.empty(len(q), np.float32)
    for s in range(0, len(q), q_rows):
        qs = q[s : s + q_rows]
        best = np.zeros((len(qs), 0), np.float32)  # running top-k similarities (unordered)
        for b in range(0, len(background), bg_rows):
            cand = np.concatenate([best, qs @ np.asarray(background[b : b + bg_rows], np.float32).T], 1)
            best = -np.partition(-cand, k - 1, axis=1)[:, :k] if cand.shape[1] > k else cand
        top = -np.sort(-best, axis=1)
        out[s : s + len(qs)] = beta * top[:, ranks[0] : k].mean(1)
    return out
