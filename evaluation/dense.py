"""Dense linear probe: semantic segmentation from frozen patch tokens, scored by mIoU (paper §7.4 "linear").

A linear layer maps each last-layer patch token to class logits; logits are upsampled bilinearly to the label
resolution and trained with pixel cross-entropy (label 255 ignored). The reference head (dinov2 ``BNHead``) puts a
trainable BatchNorm before the 1x1 conv; here tokens are standardised with fixed train-set statistics instead
(the same affine family at inference). Optimiser as the reference's linear configs: AdamW, lr 1e-3, weight decay
1e-4, linear (poly 1.0) decay to 0, batch 16, 40k iterations by default.

Dataset layout (mmseg / ADE20k style): ``<root>/images/<split>/<stem>.<ext>`` with ``<root>/annotations/<split>/
<stem>.png`` holding class ids per pixel (255 = ignore), and an optional ``<root>/classes.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.features import ImageSet, image_set_from_files
from infra.images import is_hidden, is_image_name

IGNORE = 255


def confusion(pred: np.ndarray, target: np.ndarray, n_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """(C, C) pixel counts, rows = ground truth, columns = prediction; ignored pixels left out."""
    valid = target != ignore
    t, p = target[valid].astype(np.int64), pred[valid].astype(np.int64)
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from both ground truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(pred: np.ndarray, target: np.ndarray, n_classes: int, ignore: int = IGNORE) -> tuple[float, np.ndarray]:
    """(mIoU %, per-class IoU) over all pixels of all images (classes with an empty union are left out)."""
    iou = iou_from_confusion(confusion(pred, target, n_classes, ignore))
    return float(np.nanmean(iou) * 100), iou


def pixel_accuracy(pred: np.ndarray, target: np.ndarray, ignore: int = IGNORE) -> float:
    valid = target != ignore
    return float((pred[valid] == target[valid]).mean() * 100)


# --- reference points: what a number means on a given benchmark and patch grid ---------------------------------
def majority_baseline(train_masks: np.ndarray, test_masks: np.ndarray, n_classes: int) -> tuple[float, float]:
    """(mIoU %, pixel accuracy %) of labelling every test pixel with the most frequent training class."""
    counts = np.bincount(train_masks[train_masks != IGNORE].ravel().astype(np.int64), minlength=n_classes)
    pred = np.full(test_masks.shape, int(counts.argmax()), np.uint8)
    return mean_iou(pred, test_masks, n_classes)[0], pixel_accuracy(pred, test_masks)


def patch_majority(masks: np.ndarray, grid: tuple[int, int], n_classes: int) -> np.ndarray:
    """Each pixel labelled with the most frequent class of its patch cell (``grid`` = patch tokens per side): the
    labelling of a perfect classifier of patches, which cannot follow anything thinner than a patch."""
    n, height, width = masks.shape
    rows = np.searchsorted(np.round(np.arange(1, grid[0]) * height / grid[0]), np.arange(height), side="right")
    cols = np.searchsorted(np.round(np.arange(1, grid[1]) * width / grid[1]), np.arange(width), side="right")
    cell = rows[:, None] * grid[1] + cols[None, :]  # H, W -> patch index
    out = np.empty_like(masks)
    for i in range(n):
        valid = masks[i] != IGNORE
        counts = np.bincount(cell[valid] * n_classes + masks[i][valid], minlength=grid[0] * grid[1] * n_classes)
        out[i] = counts.reshape(-1, n_classes).argmax(1)[cell]  # a cell without labels: class 0 (nothing scored)
    return out


# --- data ------------------------------------------------------------------------------------------------------
@dataclass
class SegmentationSplit:
    images: ImageSet
    masks: list[np.ndarray]  # H, W uint8 class ids (255 ignore), one per image


def read_segmentation_split(root: Path, split: str) -> SegmentationSplit:
    img_dir, ann_dir = Path(root) / "images" / split, Path(root) / "annotations" / split
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise FileNotFoundError(f"segmentation set {root}: expected images/{split}/ and annotations/{split}/")
    files = sorted(p for p in img_dir.iterdir() if is_image_name(p.name) and not is_hidden(Path(p.name)))
    masks = []
    for f in files:
        ann = ann_dir / f"{f.stem}.png"
        if not ann.is_file():
            raise FileNotFoundError(f"segmentation set {root}: no annotation {ann} for {f.name}")
        masks.append(np.asarray(Image.open(ann)))
    return SegmentationSplit(image_set_from_files(files), masks)


def mask_transform(mask: np.ndarray, size: int) -> np.ndarray:
    """The geometry of ``infra.features.eval_transform`` (shorter side to ``size``, centre crop), nearest-neighbour."""
    h, w = mask.shape
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    m = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
    left, top = (nw - size) // 2, (nh - size) // 2
    return m[top : top + size, left : left + size]


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """0 ("other") -> ignored; 1..K -> 0..K-1; 255 stays ignored (mmseg ``reduce_zero_label``)."""
    out = mask.astype(np.int64) - 1
    out[(mask == 0) | (mask == IGNORE)] = IGNORE
    return out.astype(np.uint8)


def class_count(root: Path, masks: list[np.ndarray]) -> int:
    names = Path(root) / "classes.txt"
    if names.is_file():
        return len([line for line in names.read_text().splitlines() if line.strip()])
    return int(max(int(m[m != IGNORE].max(initial=0)) for m in masks)) + 1


# --- probe -----------------------------------------------------------------------------------------------------
@dataclass
class DenseProbeResult:
    miou: float
    iou: np.ndarray  # per class
    pixel_accuracy: float


def _logits(tokens: torch.Tensor, w: torch.Tensor, b: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """tokens (B, h, w, D) -> upsampled logits (B, C, H, W)."""
    z = tokens @ w + b  # B, h, w, C
    return F.interpolate(z.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)


def dense_linear_probe(
    train_tokens: np.ndarray, train_masks: np.ndarray, test_tokens: np.ndarray, test_masks: np.ndarray,
    n_classes: int, *, iterations: int = 40_000, batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-4,
    seed: int = 0,
) -> DenseProbeResult:  # fmt: skip
    """Tokens (N, h, w, D); masks (N, H, W) with class ids and 255 = ignore."""
    g = torch.Generator().manual_seed(seed)
    xtr = torch.from_numpy(np.asarray(train_tokens, np.float32))
    mean, std = xtr.mean((0, 1, 2)), xtr.std((0, 1, 2)).clamp_min(1e-6)
    xtr = (xtr - mean) / std
    ytr = torch.from_numpy(np.asarray(train_masks, np.int64))
    size = tuple(ytr.shape[1:])
    w = (torch.randn(xtr.shape[-1], n_classes, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1 - it / iterations)  # poly, power 1, to 0
    for _ in range(iterations):
        idx = torch.randint(len(xtr), (batch_size,), generator=g)
        loss = F.cross_entropy(_logits(xtr[idx], w, b, size), ytr[idx], ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        xte = (torch.from_numpy(np.asarray(test_tokens, np.float32)) - mean) / std
        yte = np.asarray(test_masks)
        pred = torch.cat([_logits(xte[i : i + 256], w, b, size).argmax(1) for i in range(0, len(xte), 256)]).numpy()
    miou, iou = mean_iou(pred, yte, n_classes)
    return DenseProbeResult(miou, iou, pixel_accuracy(pred, yte))
