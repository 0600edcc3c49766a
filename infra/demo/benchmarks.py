"""The demo's extra benchmarks, derived from its crawl: digit-stroke segmentation and planted-copy detection.

- ``eval/mnist_seg``: every MNIST evaluation image with a mask that labels stroke pixels by digit (class d + 1) and
  the background 0; the anti-aliased rim between the two thresholds is 255 (ignored). Standard folder layout:
  ``images/<split>/*.png``, ``annotations/<split>/*.png``, ``classes.txt``.
- copy detection: the crawl's ``truth.parquet`` (``eval_copy`` rows are copies of evaluation test images; other digit
  rows are distractor queries) against the evaluation test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from infra.config.evaluate import CopyDetectionBenchmark, SegmentationBenchmark
from infra.storage import atomic_path, atomic_write_text

STROKE, BACKGROUND = 128, 32  # grey levels: >= STROKE is the digit, < BACKGROUND the background
SEGMENTATION_DIR = Path("eval") / "mnist_seg"


def stroke_mask(img: np.ndarray, digit: int) -> np.ndarray:
    mask = np.full(img.shape, 255, np.uint8)
    mask[img >= STROKE] = digit + 1
    mask[img < BACKGROUND] = 0
    return mask


def build_digit_segmentation(classification_root: Path, out: Path) -> Path:
    """``classification_root/<split>/<digit>/*.png`` -> the segmentation set under ``out`` (idempotent)."""
    for split_dir in sorted(p for p in Path(classification_root).iterdir() if p.is_dir()):
        for digit_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            digit = int(digit_dir.name)
            for f in sorted(digit_dir.glob("*.png")):
                img = np.asarray(Image.open(f).convert("L"))
                for sub, arr in (("images", img), ("annotations", stroke_mask(img, digit))):
                    dst = out / sub / split_dir.name / f.name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(dst, fsync=False) as tmp:
                        Image.fromarray(arr).save(tmp, "PNG")
    atomic_write_text(out / "classes.txt", "\n".join(["background", *(f"digit {d}" for d in range(10))]) + "\n")
    return out


def demo_benchmarks(crawl_dir: Path) -> list[SegmentationBenchmark | CopyDetectionBenchmark]:
    crawl_dir = Path(crawl_dir)
    return [
        # Stroke pixels only (which digit does this patch belong to): the background is 86% of the pixels and a 4x4
        # patch grid cannot outline a stroke, so scoring it would mostly measure the majority-class floor.
        SegmentationBenchmark(name="mnist-strokes", root=crawl_dir / SEGMENTATION_DIR, reduce_zero_label=True,
                              n_classes=10),
        CopyDetectionBenchmark(name="mnist-copies", ground_truth=crawl_dir / "truth.parquet",
                               references=crawl_dir / "eval" / "mnist" / "test"),
    ]
