"""Frozen features for every protocol, extracted once per (model, dataset, transform) and cached on disk.

What is kept per image (the inputs of all dinov2 eval protocols):

- ``cls`` (N, L, D): the layer-normed class token of each of the last L blocks (L = 4, or fewer blocks);
  ``cls[:, -1]`` is ``model(x)``, the kNN / retrieval / copy-detection descriptor;
- ``patch_mean`` (N, D): the mean of the last block's (normed) patch tokens (the linear probe's avgpool);
- ``patch`` (N, h, w, D): the last block's patch tokens, only when a dense protocol asks for them.

The cache key is the model fingerprint (checkpoint sha256, or architecture + seed for a random init), the dataset
digest (image sha256s and labels, in order), the image size and the layout version: any change misses the cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from infra.console import Progress
from infra.datasets import DatasetError, decode_item, iter_images
from infra.features import eval_transform
from infra.images import decode
from infra.storage import atomic_path, atomic_write_json

log = logging.getLogger(__name__)
LAYOUT = "lvd.features.v2"  # bump when what is stored changes
N_LAST = 4  # the linear probe's largest n_last_blocks (dinov2 eval/linear.py)


@dataclass
class Features:
    cls: np.ndarray  # N, L, D
    patch_mean: np.ndarray  # N, D
    patch: np.ndarray | None = None  # N, h, w, D

    @property
    def global_(self) -> np.ndarray:
        """(N, D) float32 L2-normalised last-block class token: the descriptor of kNN, retrieval, copy detection."""
        return l2n(self.cls[:, -1])

    def take(self, idx: np.ndarray) -> Features:
        return Features(self.cls[idx], self.patch_mean[idx], None if self.patch is None else self.patch[idx])


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class FeatureModel(Protocol):
    name: str
    fingerprint: str
    image_size: int

    def __call__(self, x: torch.Tensor, patches: bool) -> dict[str, torch.Tensor]: ...


@dataclass
class TokenBackbone:
    """A ViT with ``get_intermediate_layers`` (this project's / official DINOv2) or timm's ``forward_intermediates``."""

    model: torch.nn.Module
    name: str
    fingerprint: str
    image_size: int

    def _layers(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(patch tokens B, N, D, class token B, D)] of the last <= 4 blocks, normed."""
        m = self.model
        depth = getattr(m, "n_blocks", None) or len(getattr(m, "blocks", [])) or N_LAST
        n = min(N_LAST, depth)
        if hasattr(m, "forward_intermediates") and not hasattr(m, "n_blocks"):  # timm
            outs = m.forward_intermediates(x, indices=n, norm=True, output_fmt="NLC", intermediates_only=True,
                                           return_prefix_tokens=True)  # fmt: skip
            # prefix = [cls, registers]; a ViT without a class token pools its patch tokens instead
            return [(tokens, prefix[:, 0] if prefix.shape[1] else tokens.mean(1)) for tokens, prefix in outs]
        return list(m.get_intermediate_layers(x, n=n, return_class_token=True, norm=True))

    def __call__(self, x: torch.Tensor, patches: bool) -> dict[str, torch.Tensor]:
        layers = self._layers(x)
        last = layers[-1][0]  # B, N, D
        out = {"cls": torch.stack([c for _, c in layers], 1), "patch_mean": last.mean(1)}
        if patches:
            side = round(last.shape[1] ** 0.5)
            out["patch"] = last.reshape(len(x), side, side, -1)
        return out


@dataclass
class GlobalBackbone:
    """Any model whose ``forward`` gives a pooled embedding (e.g. a timm CNN built with num_classes=0)."""

    model: torch.nn.Module
    name: str
    fingerprint: str
    image_size: int

    def __call__(self, x: torch.Tensor, patches: bool) -> dict[str, torch.Tensor]:
        z = self.model(x)  # B, D
        out = {"cls": z[:, None], "patch_mean": z}
        if patches:
            fmap = self.model.forward_features(x)  # B, C, h, w
            out["patch"] = fmap.permute(0, 2, 3, 1)
        return out


@dataclass
class PixelModel:
    """The raw-pixel baseline: the normalised image as one vector ("class token"); its "patch tokens" are the
    pixels of each p x p cell, so avgpool is the mean cell (3 p^2 values), as for a ViT."""

    image_size: int
    patch_size: int = 4
    name: str = "raw-pixels"

    @property
    def fingerprint(self) -> str:
        return f"pixels:{self.image_size}:{self.patch_size}"

    def __call__(self, x: torch.Tensor, patches: bool) -> dict[str, torch.Tensor]:
        p = self.patch_size
        b, c, h, w = x.shape
        cells = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)
        out = {"cls": x.flatten(1)[:, None], "patch_mean": cells.mean((1, 2))}
        if patches:
            out["patch"] = cells
        return out


def wrap(model: torch.nn.Module, name: str, fingerprint: str, image_size: int) -> FeatureModel:
    """Token features for ViTs (this project's and official DINOv2: ``n_blocks``; timm's: ``num_prefix_tokens``),
    a pooled embedding and feature map for anything else (timm CNNs also have ``forward_intermediates``)."""
    if hasattr(model, "n_blocks") or hasattr(model, "num_prefix_tokens"):
        return TokenBackbone(model.eval(), name, fingerprint, image_size)
    return GlobalBackbone(model.eval(), name, fingerprint, image_size)


@cache
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(kind: str, arch: str, path: Path | None, seed: int, **extra: Any) -> str:
    """What a model's features depend on: the checkpoint bytes, or the architecture and seed of a random init."""
    if path is not None:
        return f"{kind}:{arch}:sha256={file_sha256(Path(path).resolve())}"
    return f"{kind}:{arch}:random:seed={seed}:" + json.dumps(extra, sort_keys=True, default=str)


# --- datasets --------------------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """Images known by content hash; decoded only when features are not cached."""

    ids: list[str]
    load: Callable[[], Iterator[Image.Image]]  # the images, in order, decoded one at a time (never all held)
    labels: np.ndarray | None = None
    names: list[str] = field(default_factory=list)

    @property
    def content_digest(self) -> str:
        """The images alone, in order: what features depend on (labels do not)."""
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()

    @property
    def digest(self) -> str:
        """Images and labels, in order: the identity of a benchmark split (recorded with results)."""
        h = hashlib.sha256()
        labels = self.labels if self.labels is not None else [None] * len(self.ids)
        for i, y in zip(self.ids, labels, strict=True):
            h.update(f"{i}:{'' if y is None else int(y)}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.ids)


def read_image_set(path: Path, fmt: str = "auto", need_labels: bool = True) -> ImageSet:
    """A set's ids, labels and names, read once (each file's bytes hashed and let go); its images are read again and
    decoded one at a time when features are extracted, so memory does not grow with the set (an ImageNet-sized
    evaluation split held 6 GB of bytes and every decoded image at once before)."""
    ids, labels, names = [], [], []
    for it in iter_images(Path(path), fmt):
        if need_labels and it.label is None:
            raise ValueError(f"{path}: image {it.name} has no label; classification splits need class labels")
        ids.append(it.image_id)
        labels.append(it.label)
        names.append(it.name)

    def load() -> Iterator[Image.Image]:
        for i, it in enumerate(iter_images(Path(path), fmt)):
            if i >= len(ids) or it.image_id != ids[i]:
                raise DatasetError(f"{path}: {it.name} changed while the set was evaluated; run again")
            yield decode_item(it, path)

    return ImageSet(ids, load, np.asarray(labels, np.int64) if need_labels else None, names)


def image_set_from_files(paths: Sequence[Path]) -> ImageSet:
    paths = [Path(p) for p in paths]
    ids = [file_sha256(p) for p in paths]
    return ImageSet(ids, lambda: (decode(p.read_bytes()) for p in paths), None, [str(p) for p in paths])


# --- extraction and cache --------------------------------------------------------------------------------------
@dataclass
class FeatureExtractor:
    """Runs a model over image sets in batches (bf16 autocast on CPU by default) and caches the results."""

    cache_dir: Path | None
    batch_size: int = 256
    precision: str = "bf16"
    hits: int = 0
    misses: int = 0

    def key(self, model: FeatureModel, images: ImageSet, patches: bool) -> str:
        spec = {"layout": LAYOUT, "model": model.fingerprint, "data": images.content_digest, "size": model.image_size,
                "precision": self.precision, "patches": patches}  # fmt: skip
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def __call__(self, model: FeatureModel, images: ImageSet, patches: bool = False) -> Features:
        key = self.key(model, images, patches)
        cached = self._load(key, patches)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        feats = self.extract(model, images.load(), patches, total=len(images))
        self._store(key, feats, model, images)
        return feats

    @torch.inference_mode()
    def extract(self, model: FeatureModel, images: Iterable[Image.Image], patches: bool,
                total: int | None = None) -> Features:  # fmt: skip
        """Features of ``images``, taken ``batch_size`` at a time from the iterable (a set's images are decoded as
        they are needed)."""
        parts: dict[str, list[np.ndarray]] = {"cls": [], "patch_mean": [], "patch": []}
        stream = iter(images)
        with Progress(f"features of {model.name}", total, unit="images", quiet=True) as progress:
            while batch := list(itertools.islice(stream, self.batch_size)):
                x = torch.stack([eval_transform(im, model.image_size) for im in batch])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                    out = model(x, patches)
                for k, v in out.items():
                    parts[k].append(v.float().numpy())
                progress.advance(len(x))
        if not parts["cls"]:
            raise ValueError("no images to extract features from")
        cat = {k: np.concatenate(v) for k, v in parts.items() if v}
        return Features(cat["cls"], cat["patch_mean"], cat.get("patch"))

    def _dir(self, key: str) -> Path | None:
        return None if self.cache_dir is None else Path(self.cache_dir) / key[:2] / key

    def _load(self, key: str, patches: bool) -> Features | None:
        d = self._dir(key)
        if d is None or not (d / "meta.json").is_file():  # meta.json is written last
            return None
        arrays = {n: np.load(d / f"{n}.npy", mmap_mode="r") for n in ("cls", "patch_mean")}
        patch = np.load(d / "patch.npy", mmap_mode="r") if patches else None
        return Features(arrays["cls"], arrays["patch_mean"], patch)

    def _store(self, key: str, feats: Features, model: FeatureModel, images: ImageSet) -> None:
        d = self._dir(key)
        if d is None:
            return
        for name in ("cls", "patch_mean", "patch"):
            arr = getattr(feats, name)
            if arr is not None:
                with atomic_path(d / f"{name}.npy") as tmp, open(tmp, "wb") as f:
                    np.save(f, arr)
        atomic_write_json(d / "meta.json", {"model": model.name, "fingerprint": model.fingerprint, "n": len(images),
                                            "content_digest": images.content_digest, "image_size": model.image_size})
        log.debug("cached %s features of %d images under %s", model.name, len(images), d)
