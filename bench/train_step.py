"""Throughput of the full DINOv2 training step (2 global + 8 local crops, DINO + iBOT + KoLeo, AdamW, EMA).

Models: ViT-S/14 at 224/98 (reference heads: 65,536 prototypes) and the CPU demo model (training/recipes.py:DEMO).
Variants: fp32 vs bf16 autocast, with / without sequence packing, efficient (subset) vs standard drop path (rate
0.3 for both, so only the implementation differs). Model FLOPs are counted once per model with
torch.utils.flop_counter (drop path off: the nominal work of the step) and reported as utilisation of the
matmul peak of each dtype, measured in the same run with a large matmul. On a CUDA host the student and teacher
are wrapped with FSDP (one process) and bf16 runs on the GPU.

    python bench/train_step.py            # CPU: a few minutes
    python bench/train_step.py --quick    # fewer variants and steps
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
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

VIT_S = ["train.student.arch=vit_small", "train.student.patch_size=14", "train.crops.global_crops_size=224",
         "train.crops.local_crops_size=98", "train.student.drop_path_rate=0.3", "train.crops.local_crops_number=8"]


def peak_tflops(dtype: torch.dtype, device: torch.device, n: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    _sync(device)
    reps = 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


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


def build(cfg, device: torch.device, fsdp: bool):
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg).to(device).train()
    if fsdp:
        from training.fsdp import wrap_fsdp

        wrap_fsdp({"student": meta.student, "teacher": meta.teacher}, cfg, device)
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


def measure(cfg, batch_size: int, dtype: str, device: torch.device, steps: int, fsdp: bool) -> float:
    meta, opt = build(cfg, device, fsdp)
    batch = synthetic_batch(cfg, batch_size, device)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    train_step(meta, opt, batch, autocast)  # warm-up (allocations, kernels)
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        train_step(meta, opt, batch, autocast)
    _sync(device)
    return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer variants and steps")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    fsdp = cuda and _init_single_process_group()
    peaks = {"fp32": peak_tflops(torch.float32, device, 8192 if cuda else 2048),
             "bf16": peak_tflops(torch.bfloat16, device, 8192 if cuda else 2048)}
    demo = load_config(None, overrides(DEMO)).train
    demo_name = f"demo {demo.student.arch}/{demo.student.patch_size} {demo.crops.global_crops_size}+" \
                f"{demo.crops.local_crops_size}"
    models = [("vit_small/14 224+98", load_config(None, VIT_S).train, 32 if cuda else 2, 5 if cuda else 1),
              (demo_name, demo, 256 if cuda else demo.batch_size_per_gpu, 5 if cuda else 4)]
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} ({args.threads} threads), fsdp={fsdp}; "
          f"matmul peak fp32 {peaks['fp32']:.3f} TFLOP/s, bf16 {peaks['bf16']:.3f} TFLOP/s")
    header = f"{'model':24} {'batch':>5} {'dtype':>5} {'packing':>7} {'droppath':>9} {'img/s':>8} {'step ms':>9} " \
             f"{'TFLOP/s':>8} {'MFU':>6}"
    print(header)
    print("-" * len(header))
    for name, cfg, batch_size, steps in models:
        cfg.student.drop_path_rate = 0.3
        cfg.student.drop_path_uniform = True
        flops = step_flops(cfg, batch_size)
        for dtype in ("fp32", "bf16"):
            for packing, efficient in ([(True, True), (False, True), (True, False)] if args.quick else
                                       [(True, True), (False, True), (True, False), (False, False)]):
                cfg.sequence_packing = packing
                block_mod.EFFICIENT_DROP_PATH_MIN = 0.1 if efficient else 1.0  # 1.0: always the per-sample variant
                dt = measure(cfg, batch_size, dtype, device, steps, fsdp)
                tflops = flops / dt / 1e12
                print(f"{name:24} {batch_size:>5} {dtype:>5} {packing!s:>7} {'subset' if efficient else 'sample':>9} "
                      f"{batch_size / dt:>8.1f} {dt * 1e3:>9.0f} {tflops:>8.3f} {tflops / peaks[dtype]:>6.1%}", flush=True)
        block_mod.EFFICIENT_DROP_PATH_MIN = 0.1
        print(f"{name}: {flops / 1e9:.1f} GFLOP per step of {batch_size} images (nominal, drop path off)")
    for name, dim, heads, n_global, n_local, b in [("vit_small 224+98", 384, 6, 257, 50, 2 if not cuda else 32),
                                                   (demo_name[5:], ARCHS[demo.student.arch]["embed_dim"],
                                                    ARCHS[demo.student.arch]["num_heads"],
                                                    1 + (demo.crops.global_crops_size // demo.student.patch_size) ** 2,
                                                    1 + (demo.crops.local_crops_size // demo.student.patch_size) ** 2,
                                                    demo.batch_size_per_gpu)]:
        grouped, dense = packed_attention_variants(device, b, dim, heads, n_global, n_local)
        print(f"packed attention {name} (B={b}): grouped SDPA {grouped:.1f} ms, dense block-diagonal mask "
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
