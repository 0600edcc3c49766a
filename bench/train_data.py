"""The training data stream's cost per batch: greyscale images on one channel against the three-channel baseline.

    python bench/train_data.py [--rounds 5] [--batches 20] [--threads 2]

The multi-crop stream (decode, RandomResizedCrop, colour jitter, greyscale, blur, solarisation, masks, collate) is
timed as the training loop calls it (`BatchStream.batch`, one step after another, in this process), for two
variants of the same stream, alternating, each warmed up before its rounds:

- ``rgb``: every image decoded to RGB and every op on three channels (``grey_path=False``);
- ``grey``: the default, 8-bit greyscale images cropped and jittered on one channel and replicated at the end.

Both give the same batches bit for bit (checked on the first batch of every row). Rows: the demo recipe on the
demo's MNIST digits (28 px grey, 2 x 28 + 2 x 14 crops, batch 32), and the default recipe (2 x 224 + 8 x 98, batch
8) on grey and on colour photographs that ship with scikit-image (colour images take the three-channel path in both
variants: the row shows what the greyness check costs them). Prints medians of the rounds, wall and CPU ms per
batch (CPU: this process, all threads), and the ratio rgb / grey.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import skimage.data
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.config.schema import load_config
from training.data import build_source
from training.module import DinoV2DataModule
from training.recipes import DEMO, overrides

GREY_PHOTOS = ("camera.png", "coins.png", "moon.png", "page.png", "text.png", "horse.png", "brick.png", "grass.png")
COLOUR_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")


def photo_folder(root: Path, names: tuple[str, ...], mode: str) -> Path:
    root.mkdir(parents=True)
    for name in names:
        with Image.open(Path(skimage.data.__file__).parent / name) as img:
            img.convert(mode).save(root / f"{Path(name).stem}.png")
    return root


def digit_folder(root: Path) -> Path:
    from training.demo_check import mnist_split, write_folder

    return write_folder(mnist_split()["pretrain"][0], root)


def streams(folder: Path, recipe: list[str]) -> dict:
    cfg = load_config(None, recipe).train
    module = DinoV2DataModule(build_source(folder), cfg, seed=0)
    out = {}
    for name, grey in (("rgb", False), ("grey", True)):
        stream = module.make_stream()
        stream.transform.grey_path = grey and stream.transform.impl == "batched"
        out[name] = stream
    return out


def same_batches(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20, help="batches per round and variant")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the demo trains on 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lvd-bench-data-"))
    demo = overrides(DEMO)
    rows = [("demo recipe, MNIST digits (grey)", digit_folder(tmp / "digits"), demo),
            ("default recipe, grey photos", photo_folder(tmp / "grey", GREY_PHOTOS, "L"), ["train.batch_size_per_gpu=8"]),
            ("default recipe, colour photos", photo_folder(tmp / "colour", COLOUR_PHOTOS, "RGB"),
             ["train.batch_size_per_gpu=8"])]
    print(f"{os.cpu_count()} cores, {args.threads} torch threads, load average {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} rounds x {args.batches} batches per variant\n")
    print(f"{'row':40s} {'rgb ms':>8s} {'CPU ms':>8s} {'grey ms':>8s} {'CPU ms':>8s} {'ratio':>6s} {'CPU':>6s}  same")
    for label, folder, recipe in rows:
        variants = streams(folder, recipe)
        same = same_batches(variants["rgb"].batch(0), variants["grey"].batch(0))
        for s in variants.values():  # warm-up
            s.batch(1)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        step = 2
        for _ in range(args.rounds):
            for name, s in variants.items():
                w, c = time.perf_counter(), time.process_time()
                for i in range(args.batches):
                    s.batch(step + i)
                times[name].append(((time.perf_counter() - w) / args.batches * 1e3,
                                    (time.process_time() - c) / args.batches * 1e3))
            step += args.batches
        med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
        (rw, rc), (gw, gc) = med["rgb"], med["grey"]
        print(f"{label:40s} {rw:8.1f} {rc:8.1f} {gw:8.1f} {gc:8.1f} {rw / gw:5.2f}x {rc / gc:5.2f}x  {same}")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
