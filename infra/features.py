"""Images -> L2-normalised global features with any backbone (shared by embedding and evaluation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from infra.precision import resolve

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) normalised tensor: shorter side to ``size`` (bicubic), centre crop (dinov2's eval transform
    at this size); shared by embedding and evaluation so both see the same pixels."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0)
    x = x.permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


@dataclass
class Embedder:
    """images -> (N, D) float32 L2-normalised embeddings from ``model(x)`` (the normalised cls token)."""

    model: torch.nn.Module
    image_size: int
    name: str
    batch_size: int = 256
    precision: str = "bf16"

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return eval_transform(img, self.image_size)

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        self.model.eval()
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(im) for im in images[i : i + self.batch_size]])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve(self.precision) == "bf16"):
                z = self.model(x)
            out.append(F.normalize(z.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class PixelFeatures:
    """The raw-pixel baseline: the image resized to ``image_size`` (RGB), flattened, L2-normalised."""

    image_size: int
    name: str = "raw-pixels"

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        s = self.image_size
        arr = np.stack([np.asarray(im.convert("RGB").resize((s, s), Image.BILINEAR), np.float32).ravel() for im in images])
        return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-6)
