"""NSFW scoring speed: onnxruntime fp32 and int8 vs open_nsfw in PyTorch (fp32, bf16), side by side on the same images.

    python bench/nsfw.py [--n 128] [--rounds 5] [--batch 64] [--accuracy]

Each round scores the same N images with every scorer, in turn (onnxruntime, onnxruntime int8, torch fp32, torch bf16,
then the next round), so that a machine shared with other jobs slows them alike; medians over rounds and their ratios are printed.
A round is ``scorer.score`` on batches of ``--batch``: preprocessing (resize, crop, BGR, mean) plus the network,
what the stage pays per image. The same rounds time a 2048^3 matmul in fp32 and in bf16, the machine's limits, and
each scorer's network GFLOP/s is put against them. ``--accuracy`` also scores 421 real images (scikit-image
photographs, lfw_subset, MNIST digits) with every scorer and prints the largest score and logit differences to
onnxruntime and the decisions that differ at the threshold and at the median score (int8 and bf16 without and
with the fp32 re-check; a re-check is set up for its threshold, so each threshold gets its own scorers).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curation.models.open_nsfw import open_nsfw
from curation.nsfw import OpenNsfw, OpenNsfwInt8, OpenNsfwTorch, cpu_has_amx_bf16
from infra.config.ingest import NsfwConfig
from infra.cpus import cpus

REPO = Path(__file__).resolve().parent.parent
NAMES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "page", "hubble_deep_field"]


def images(n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        arr = getattr(skimage.data, NAMES[i % len(NAMES)])()
        img = Image.fromarray(arr.astype(np.uint8) * (255 if arr.dtype == bool else 1)).convert("RGB")
        img.thumbnail((96 + i % 64, 96 + i % 64))  # ingest stores images of at most image_size px
        out.append(img)
    return out


def real_images() -> list[Image.Image]:
    from infra.demo.mnist import load_mnist

    out = []
    for name in ["astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
                 "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina",
                 "rocket", "text", "checkerboard", "binary_blobs"]:  # fmt: skip
        arr = getattr(skimage.data, name)()
        arr = arr[..., :3] if arr.ndim == 3 else arr  # logo: RGBA
        out.append(Image.fromarray(arr.astype(np.uint8) * (255 if arr.dtype == bool else 1)).convert("RGB"))
    out += [Image.fromarray(f) for f in (skimage.data.lfw_subset() * 255).round().astype(np.uint8)]
    digits, _ = load_mnist()
    return out + [Image.fromarray(d) for d in digits[25::25]]


def network_gflop() -> float:
    """Multiply-adds x 2 of one image through the network (convs and fc), counted with forward hooks."""
    model, flops = open_nsfw(), []

    def hook(mod: torch.nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        w = mod.weight
        flops.append(2 * out.numel() * w[0].numel())  # per output element: one MAC per weight of its filter

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            m.register_forward_hook(hook)
    with torch.inference_mode():
        model(torch.zeros(1, 3, 224, 224))
    return sum(flops) / 1e9


def matmul_tflops(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


CPU_MS: dict[str, list[float]] = {}  # CPU ms/image of this process per scorer and round (less disturbed by other jobs)


def ms_per_image(score: Callable[[list[Image.Image]], np.ndarray], imgs: list[Image.Image], batch: int,
                 name: str = "") -> float:  # fmt: skip
    t, c = time.perf_counter(), time.process_time()
    for i in range(0, len(imgs), batch):
        score(imgs[i : i + batch])
    CPU_MS.setdefault(name, []).append((time.process_time() - c) / len(imgs) * 1000)
    return (time.perf_counter() - t) / len(imgs) * 1000


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def accuracy(make: Callable[[float], dict], threshold: float) -> None:
    """Decisions of every scorer vs onnxruntime fp32 at ``threshold`` and at the median fp32 score."""
    imgs = real_images()

    def scores(scorers: dict) -> dict[str, np.ndarray]:
        return {k: np.concatenate([sc.score(imgs[i : i + 64]) for i in range(0, len(imgs), 64)])
                for k, sc in scorers.items()}  # fmt: skip

    s = scores(make(threshold))
    ref = s["onnxruntime"]
    for t in (threshold, float(np.median(ref))):
        s = s if t == threshold else scores(make(t))
        print(f"\naccuracy on {len(imgs)} real images (onnxruntime scores {ref.min():.2g}..{ref.max():.2g}), threshold "
              f"{t:.4g}:")  # fmt: skip
        for k, v in s.items():
            if k != "onnxruntime":
                flips = int(((v >= t) != (ref >= t)).sum())
                print(f"  {k:32s} max |score diff| {np.abs(v - ref).max():.3g}   max |logit diff| "
                      f"{np.abs(logit(v) - logit(ref)).max():.3g}   decisions differing: {flips} "
                      f"(agreement {1 - flips / len(imgs):.1%})")  # fmt: skip


MEMORY_CODE = """
import json, os, sys, threading
from bench.nsfw import images
from curation.nsfw import scorer_for
from infra.config.ingest import NsfwConfig
backend, batch, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
scorer = scorer_for(NsfwConfig(backend=backend, batch_size=batch))  # (a model built on first use: its peak is before)
imgs = images(batch)
scorer.score(imgs[:2])  # the session loaded, its arena started
before, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.wait(0.002):
        peak[0] = max(peak[0], rss())
sampler = threading.Thread(target=sample)
sampler.start()
threads = [threading.Thread(target=lambda: [scorer.score(imgs) for _ in range(2)]) for _ in range(k)]
for t in threads:
    t.start()
for t in threads:
    t.join()
done.set()
sampler.join()
print(json.dumps((max(peak[0], rss()) - before) / k))
"""


def batch_memory(backend: str, batch: int, in_flight: int) -> float:
    """Resident bytes each of `in_flight` batches of `batch` images adds while scored at once (threads sharing one
    model, as a stage's shards do), measured in a fresh process: its resident memory, sampled every 2 ms, over what it
    held after a first batch of 2."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CODE, backend, str(batch), str(in_flight)], check=True,
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return float(out.stdout.strip().splitlines()[-1])


def memory(batch: int) -> None:
    """Per-image bytes of a batch in flight, for `curation.nsfw.BATCH_BYTES_PER_IMAGE`."""
    from curation.nsfw import BATCH_BYTES_PER_IMAGE

    for backend in ("opennsfw-int8", "opennsfw"):
        per = [batch_memory(backend, batch, k) / batch for k in (1, 2, 4, 8)]
        print(f"{backend:14s} MiB per image of a batch of {batch}, 1/2/4/8 batches at once: "
              + ", ".join(f"{v / 2**20:.2f}" for v in per)
              + f"; sized at {BATCH_BYTES_PER_IMAGE[backend] / 2**20:.1f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of every scorer (0: one per core); with 1, "
                   "CPU ms/image measures the work itself on a machine shared with other jobs")
    p.add_argument("--memory", action="store_true", help="memory per batch in flight (what the stage sizes its "
                   "threads by), not speed")
    args = p.parse_args()
    if args.memory:
        return memory(args.batch)

    imgs = images(args.n)
    cfg = NsfwConfig(batch_size=args.batch, threads=args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    scorers = {
        "onnxruntime": OpenNsfw(cfg.model_copy(update={"backend": "opennsfw"})),
        "onnxruntime int8": OpenNsfwInt8(cfg.model_copy(update={"backend": "opennsfw-int8"})),
        "torch fp32": OpenNsfwTorch(cfg.model_copy(update={"backend": "opennsfw-torch", "precision": "fp32"})),
        "torch bf16": OpenNsfwTorch(cfg.model_copy(update={"backend": "opennsfw-torch", "precision": "bf16"})),
    }
    timers = {k: (lambda sc=sc, k=k: ms_per_image(sc.score, imgs, args.batch, k)) for k, sc in scorers.items()}
    timers["matmul fp32"] = lambda: matmul_tflops(torch.float32)
    timers["matmul bf16"] = lambda: matmul_tflops(torch.bfloat16)
    for sc in scorers.values():  # warm-up: oneDNN builds its kernels for each new shape once
        sc.score(imgs[: args.batch])
    runs: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(args.rounds):
        for k, fn in timers.items():
            runs[k].append(fn())
    med = {k: float(np.median(v)) for k, v in runs.items()}

    caps = getattr(torch._C._cpu, "_get_cpu_capability", dict)()
    gflop = network_gflop()
    print(f"{args.n} images, batch {args.batch}, {args.rounds} interleaved rounds, {torch.get_num_threads()} torch "
          f"threads, {cpus()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"amx_bf16={cpu_has_amx_bf16()} avx512_bf16={bool(caps.get('avx512_bf16'))}")  # fmt: skip
    print(f"matmul 2048^3: fp32 {med['matmul fp32']:.3f} TFLOP/s, bf16 {med['matmul bf16']:.3f} TFLOP/s (medians)")
    print(f"network: {gflop:.2f} GFLOP per image")
    for k in scorers:
        peak = med["matmul bf16" if "bf16" in k else "matmul fp32"]
        rate = gflop * 1000 / med[k]  # GFLOP/s of the network alone (preprocessing counted as time)
        print(f"  {k:12s} {med[k]:7.1f} ms/image (rounds: {', '.join(f'{v:.1f}' for v in runs[k])})   "
              f"{rate:.0f} GFLOP/s, {rate / 1000 / peak:.0%} of the {'bf16' if 'bf16' in k else 'fp32'} matmul")  # fmt: skip
    cpu = {k: float(np.median(CPU_MS[k])) for k in scorers}
    print("CPU ms/image of this process (medians): " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
          + "; ratio to onnxruntime: " + ", ".join(f"{k} {cpu['onnxruntime'] / v:.2f}x" for k, v in cpu.items()
                                                    if k != "onnxruntime"))  # fmt: skip
    base = med["onnxruntime"]
    print("speed-up over onnxruntime (median ms ratio): "
          + ", ".join(f"{k} {base / med[k]:.2f}x" for k in scorers if k != "onnxruntime"))  # fmt: skip
    print(f"images re-scored in fp32 near the threshold: torch bf16 {scorers['torch bf16'].rechecked}, int8 "
          f"{scorers['onnxruntime int8'].rechecked} (of {args.n * (args.rounds + 1)})")  # fmt: skip

    if args.accuracy:
        def make(t: float) -> dict:
            c = cfg.model_copy(update={"threshold": t})
            return {"onnxruntime": OpenNsfw(c), "onnxruntime int8": OpenNsfwInt8(c),
                    "onnxruntime int8 (no re-check)": OpenNsfwInt8(c.model_copy(update={"recheck_margin": 0.0})),
                    "torch bf16": OpenNsfwTorch(c.model_copy(update={"backend": "opennsfw-torch"})),
                    "torch bf16 (no re-check)": OpenNsfwTorch(c.model_copy(update={"backend": "opennsfw-torch",
                                                                                  "recheck_margin": 0.0}))}  # fmt: skip

        accuracy(make, cfg.threshold)


if __name__ == "__main__":
    main()
