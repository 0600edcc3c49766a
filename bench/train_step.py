"""Throughput of the full DINOv2 training step (2 global + 8 local crops, DINO + iBOT + KoLeo, AdamW, EMA).

Models: ViT-S/14 at 224/98 (reference heads: 65,536 prototypes) and the CPU demo model (training/recipes.py:DEMO).
Variants: fp32 vs bf16 autocast, with / without sequence packing, efficient (subset) vs standard drop path (rate
0.3 for both, so only the implementation differs). Model FLOPs are counted once per model with
torch.utils.flop_counter (drop path off: the nominal work of the step) and reported as utilisation of the
matmul peak of each dtype, measured in the same run (`peak_tflops`: the best square product through F.linear). On
a CUDA host the student and teacher are wrapped with FSDP (one process) and bf16 runs on the GPU. The precision
of each row is resolved by `training.strategy.compute_precision` as in training: fp32 rows are plain fp32 (fp32
FSDP parameters, no autocast, TF32 off), bf16 rows use bf16 FSDP mixed precision (student heads reduced in fp32)
and bf16 autocast.

Every row times `--steps` steps of `--batch` images, `--rounds` times: the variants of a (model, dtype) share one
model, warmed up by `--warmup` steps (on a GPU before every timing), and each round times every variant once, in an
order rotated from round to round, so that drift of the machine's speed (the 2-core VM's step times wander by ~20%
over a minute) lands on all variants alike. A row prints the median of its rounds and their spread (min-max ms).
CPU defaults: ViT-S/14 2 images x 2 steps x 1 round per row, the demo model its recipe batch x 4 steps x 3 rounds.
On 2 cores without native bf16 the bf16 ViT-S rows take most of the time (bf16 products there run at ~9 GFLOP/s
against ~60 in fp32); `--dtypes fp32` or `--models demo` for a short run.

    python bench/train_step.py                         # every model, dtype and variant
    python bench/train_step.py --quick                 # 3 variants instead of 4
    python bench/train_step.py --models demo --dtypes fp32 --steps 8 --rounds 9   # a subset, more steps
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import training.layers.block as block_mod
from infra.config.schema import load_config
from training.data import MaskingGenerator, collate_data_and_cast
from training.fsdp import clip_grad_norm
from training.meta_arch import SSLMetaArch
from training.recipes import DEMO, overrides
from training.registry import ARCHS
from training.strategy import compute_precision

VIT_S = ["train.student.arch=vit_small", "train.student.patch_size=14", "train.crops.global_crops_size=224",
         "train.crops.local_crops_size=98", "train.student.drop_path_rate=0.3", "train.crops.local_crops_number=8"]


def peak_tflops(dtype: torch.dtype, device: torch.device, max_n: int, budget_s: float = 0.5) -> float:
    """The best throughput of square products over n = 256, 512, ... up to `max_n`, each size timed for about
    `budget_s`; larger sizes are skipped once one product takes longer than that. Products go through `F.linear`,
    the op of the model's layers: on a CPU without AVX512-BF16 / AMX a bf16 `a @ b` takes a ~1 GFLOP/s fallback
    while bf16 `F.linear` (oneDNN) runs at ~8 (measured on the 2-core host), so `@` understated the bf16 peak
    (MFU above 100%) and spent minutes on one 2048 product."""
    import torch.nn.functional as F

    best, n = 0.0, 256
    while n <= max_n:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        t = time.perf_counter()
        F.linear(a, b)  # warm-up, and the cost of one product
        _sync(device)
        once = time.perf_counter() - t
        reps = max(1, min(100, int(budget_s / max(once, 1e-6))))
        t = time.perf_counter()
        for _ in range(reps):
            F.linear(a, b)
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
        if once > budget_s:
            break
        n *= 2
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_batch(cfg, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """Random crops with real masks (the step, not the data pipeline, is measured)."""
    g = torch.Generator().manual_seed(seed)
    c, grid = cfg.crops, cfg.crops.global_crops_size // cfg.student.patch_size
    samples = [{"global_crops": [torch.randn(3, c.global_crops_size, c.global_crops_size, generator=g)
                                 for _ in range(2)],
                "local_crops": [torch.randn(3, c.local_crops_size, c.local_crops_size, generator=g)
                                for _ in range(c.local_crops_number)]} for _ in range(batch_size)]
    batch = collate_data_and_cast(samples, tuple(cfg.ibot.mask_ratio_min_max), cfg.ibot.mask_sample_probability,
                                  grid * grid, MaskingGenerator(grid, max_num_patches=0.5 * grid * grid),
                                  random.Random(seed))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(meta, opt, batch, autocast) -> None:
    with autocast():
        terms, _ = meta.forward_losses(batch, teacher_temp=0.04)
    sum(terms.values()).backward()
    for m in meta.student.values():
        clip_grad_norm(m, 3.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    meta.update_teacher(0.994)


def build(cfg, device: torch.device, fsdp: bool, dtype: str = "fp32"):
    """The meta-architecture and optimiser of a row; under FSDP wrapped with the precision training would resolve
    for `train.precision=dtype` on this device (fp32: no mixed precision)."""
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg).to(device).train()
    if fsdp:
        from training.fsdp import wrap_fsdp

        precision = compute_precision(cfg.model_copy(update={"precision": dtype}), device.type)
        wrap_fsdp({"student": meta.student, "teacher": meta.teacher}, cfg, device, precision)
    fused = device.type in ("cpu", "cuda") and not fsdp
    return meta, torch.optim.AdamW(meta.param_groups(), lr=1e-4, fused=fused or None)


def step_flops(cfg, batch_size: int) -> float:
    """Nominal FLOPs of one step (fp32, drop path off, packing on), counted on the CPU."""
    cfg = cfg.model_copy(deep=True)
    cfg.student.drop_path_rate = 0.0
    meta, opt = build(cfg, torch.device("cpu"), fsdp=False)
    batch = synthetic_batch(cfg, batch_size, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        train_step(meta, opt, batch, contextlib.nullcontext)
    return counter.get_total_flops()


def prepare(cfg, batch_size: int, dtype: str, device: torch.device, fsdp: bool) -> Callable[[int], float]:
    """Build a (model, dtype) once; the returned function runs n steps and returns seconds per step. The variants
    share the model: `cfg.sequence_packing` and the drop-path threshold are read at every forward."""
    meta, opt = build(cfg, device, fsdp, dtype)
    batch = synthetic_batch(cfg, batch_size, device)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def run(steps: int) -> float:
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            train_step(meta, opt, batch, autocast)
        _sync(device)
        return (time.perf_counter() - t) / max(steps, 1)

    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 variants instead of 4")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    parser.add_argument("--models", default="vits,demo", help="comma-separated subset of vits,demo")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step for every model (default: ViT-S 32 on GPU / 2 on CPU; demo 256 on GPU / "
                             "its recipe batch on CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per row (default: 5 on GPU; on CPU ViT-S 2, demo 4)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timings per row, variants interleaved (default: 5 on GPU; on CPU ViT-S 1, demo 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps before timing (GPU: before every timing; CPU: once per model and dtype)")
    args = parser.parse_args(argv)
    for name, allowed in (("models", {"vits", "demo"}), ("dtypes", {"fp32", "bf16"})):
        values = [v for v in getattr(args, name).split(",") if v]
        if not values or set(values) - allowed:
            parser.error(f"--{name}: comma-separated subset of {sorted(allowed)}, got {getattr(args, name)!r}")
        setattr(args, name, values)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 rows and peak: real fp32
    fsdp = cuda and _init_single_process_group()
    peaks = {"fp32": peak_tflops(torch.float32, device, 8192 if cuda else 2048),
             "bf16": peak_tflops(torch.bfloat16, device, 8192 if cuda else 2048)}
    demo = load_config(None, overrides(DEMO)).train
    demo_name = f"demo {demo.student.arch}/{demo.student.patch_size} {demo.crops.global_crops_size}+" \
                f"{demo.crops.local_crops_size}"
    defaults = {"vits": ("vit_small/14 224+98", load_config(None, VIT_S).train, 32 if cuda else 2, 5 if cuda else 2,
                         5 if cuda else 1),
                "demo": (demo_name, demo, 256 if cuda else demo.batch_size_per_gpu, 5 if cuda else 4, 5 if cuda else 3)}
    models = [(name, cfg, args.batch or batch, args.steps or steps, args.rounds or rounds)
              for key, (name, cfg, batch, steps, rounds) in defaults.items() if key in args.models]
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} ({args.threads} threads), fsdp={fsdp}; "
          f"matmul peak fp32 {peaks['fp32']:.3f} TFLOP/s, bf16 {peaks['bf16']:.3f} TFLOP/s")
    header = f"{'model':24} {'batch':>5} {'dtype':>5} {'packing':>7} {'droppath':>9} {'img/s':>8} {'step ms':>9} " \
             f"{'spread ms':>11} {'TFLOP/s':>8} {'MFU':>6}"
    print(header)
    print("-" * len(header))
    for name, cfg, batch_size, steps, rounds in models:
        cfg.student.drop_path_rate = 0.3
        cfg.student.drop_path_uniform = True
        flops = step_flops(cfg, batch_size)
        # (packing, efficient drop path); --quick leaves out the last one.
        variants = [(True, True), (False, True), (True, False), (False, False)][:3 if args.quick else 4]
        for dtype in args.dtypes:
            # GPU: warm up before every timing (each variant has its kernels); CPU: once for the new model
            # (allocations), a CPU step of another variant has nothing to warm up, and an untimed ViT-S step there
            # costs seconds.
            run = prepare(cfg, batch_size, dtype, device, fsdp)
            if not cuda:
                run(args.warmup)
            times: dict[tuple[bool, bool], list[float]] = {v: [] for v in variants}
            for r in range(rounds):
                for packing, efficient in variants[r % len(variants):] + variants[:r % len(variants)]:
                    cfg.sequence_packing = packing
                    block_mod.EFFICIENT_DROP_PATH_MIN = 0.1 if efficient else 1.0  # 1.0: always the per-sample variant
                    if cuda:
                        run(args.warmup)
                    times[(packing, efficient)].append(run(steps))
            for packing, efficient in variants:
                ts = times[(packing, efficient)]
                dt = statistics.median(ts)
                tflops = flops / dt / 1e12
                spread = f"{min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}"
                print(f"{name:24} {batch_size:>5} {dtype:>5} {packing!s:>7} {'subset' if efficient else 'sample':>9} "
                      f"{batch_size / dt:>8.1f} {dt * 1e3:>9.0f} {spread:>11} {tflops:>8.3f} "
                      f"{tflops / peaks[dtype]:>6.1%}", flush=True)
        block_mod.EFFICIENT_DROP_PATH_MIN = 0.1
        print(f"{name}: {flops / 1e9:.1f} GFLOP per step of {batch_size} images (nominal, drop path off)")
    for name, cfg, batch_size, *_ in models:
        arch, patch, c = ARCHS[cfg.student.arch], cfg.student.patch_size, cfg.crops
        n_global, n_local = 1 + (c.global_crops_size // patch) ** 2, 1 + (c.local_crops_size // patch) ** 2
        grouped, dense = packed_attention_variants(device, batch_size, arch["embed_dim"], arch["num_heads"], n_global,
                                                   n_local, c.local_crops_number)
        print(f"packed attention {name} (B={batch_size}): grouped SDPA {grouped:.1f} ms, dense block-diagonal mask "
              f"{dense:.1f} ms ({dense / grouped:.1f}x)")


def packed_attention_variants(device: torch.device, b: int, dim: int, heads: int, n_global: int,
                              n_local: int, n_locals: int = 8, reps: int = 5) -> tuple[float, float]:
    """ms per forward of attention over one packed sequence of 2B global + 8B local crops: per-group batched
    SDPA (what the model does) vs a single SDPA call with a dense block-diagonal boolean mask."""
    import torch.nn.functional as F

    groups = [(2 * b, n_global), (n_locals * b, n_local)]
    t = sum(g * n for g, n in groups)
    q, k, v = (torch.randn(1, heads, t, dim // heads, device=device) for _ in range(3))
    seg = torch.cat([torch.arange(g, device=device).repeat_interleave(n) + off
                     for off, (g, n) in zip([0, groups[0][0]], groups, strict=True)])
    mask = seg[:, None] == seg[None, :]  # T x T block diagonal

    def grouped() -> None:
        start = 0
        for g, n in groups:
            sl = slice(start, start + g * n)
            F.scaled_dot_product_attention(*(x[0, :, sl].reshape(heads, g, n, -1).transpose(0, 1) for x in (q, k, v)))
            start += g * n

    def dense() -> None:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    out = []
    for fn in (grouped, dense):
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t0) / reps * 1e3)
    return out[0], out[1]


def _init_single_process_group() -> bool:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    return True


if __name__ == "__main__":
    main()
