"""Throughput of the full DINOv2 training step (2 global + local crops, DINO + iBOT + KoLeo, clipping, AdamW, EMA),
optionally side by side with the official dinov2 code (`--official DIR`, a local checkout; see bench/official_step.py).

What a row times: `--steps` steps of `--batch` images on one fixed synthetic batch (random crops, real iBOT masks:
the step, not the data pipeline), `--rounds` times. Every row is warmed up by `--warmup` untimed steps before the
first round (one-time kernel selection and allocation took 3.7-9.2 s of a ViT-S step on a 2-core host); each round
reads the matmul peak of each dtype (`peak_tflops`, the best square product through `F.linear`) and then times every
row once, in an order rotated from round to round, so that the drift of a shared machine lands on all rows alike.
A row prints the median of its rounds and their spread. MFU is against the best peak read over all rounds, of the
row's dtype; the FLOPs are the nominal work of the step, counted once per model with torch.utils.flop_counter
(fp32, drop path off, every token through every block as the reference computes it, attention counted as its two
batched products), so a row that skips work (this project's last block computes only the rows the losses read)
shows it as throughput. Time is the wall time of the process (`--threads` torch threads); `cpu ms` is its CPU time
per step (all threads), which other processes on a shared machine distort less than wall time, and `cpu ratio` the
official row's CPU time over the row's. On a busy host run with 1 thread and OMP_WAIT_POLICY=PASSIVE (spinning
OpenMP threads count CPU time while they wait).

With `--official DIR`: per model, rows `official fp32` (the official modules; the official code has no CPU autocast,
so fp32 is what a CPU user of it gets), `lvd fp32` and `lvd bf16`, all at the same configuration (drop path
`--drop-path`, default 0: identical work) and on the same batch; `ratio` is images/s against the official row.
Before timing, both implementations start from the same weights (the official modules load this project's
student, key names being shared) and run two full steps on the same batch: their loss terms must agree to 1e-5
(fp32), so the rows compare the same computation. Without `--official`: the variants sequence packing on/off x
efficient (subset) / per-sample drop path (rate 0.3) per dtype, as before.

Machines (see docs/training.md for measured tables): on CPUs with AMX, bf16 products run ~6-11x fp32; on AMD EPYC Zen
4 (AVX512-BF16, no AMX) ~2-3x; on CPUs with neither, bf16 is emulated and slower than fp32 (precision `auto` then
trains in fp32; `--dtypes fp32` skips those rows). The header says which CPU, its flags and the measured ratio. On a
CUDA host this project's rows are wrapped with FSDP (one process) and bf16 runs with FSDP mixed precision.

    python bench/train_step.py --official /path/to/dinov2            # ViT-S/14 and the demo model vs official
    python bench/train_step.py --official /path/to/dinov2 --models vits --dtypes fp32 --rounds 5
    python bench/train_step.py                                        # packing / drop-path variants, fp32 + bf16
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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import training.layers.attention as attention_mod
import training.layers.block as block_mod
from bench.machine import describe_machine
from infra.config.schema import load_config
from training.data import MaskingGenerator, collate_data_and_cast
from training.fsdp import clip_grad_norm
from training.meta_arch import SSLMetaArch
from training.param_groups import apply_optim_schedule
from training.recipes import DEMO, overrides
from training.registry import ARCHS
from training.strategy import compute_precision

VIT_S = ["train.student.arch=vit_small", "train.student.patch_size=14", "train.crops.global_crops_size=224",
         "train.crops.local_crops_size=98", "train.student.drop_path_rate=0.3", "train.crops.local_crops_number=8"]
MODELS = {"vits": VIT_S, "vitb": [*VIT_S, "train.student.arch=vit_base"],
          "vitl": [*VIT_S, "train.student.arch=vit_large"], "demo": overrides(DEMO)}
LR, WD, TEACHER_TEMP, MOMENTUM = 1e-4, 0.04, 0.04, 0.994
LOSS_ATOL = 1e-5


def peak_tflops(dtype: torch.dtype, device: torch.device, max_n: int, budget_s: float = 0.3) -> float:
    """The best throughput of square products over n = 256, 512, ... up to `max_n`, each size timed for about
    `budget_s`; larger sizes are skipped once one product takes longer than that. Products go through `F.linear`,
    the op of the model's layers (a bf16 `a @ b` can take a slower path than the model's bf16 `F.linear`)."""
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


def train_step(meta, opt, batch, autocast) -> dict[str, torch.Tensor]:
    """One training iteration as `training.module` runs it (fixed schedule values); returns the loss terms."""
    with autocast():
        terms, _ = meta.forward_losses(batch, teacher_temp=TEACHER_TEMP)
    sum(terms.values()).backward()
    for m in meta.student.values():
        clip_grad_norm(m, 3.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    meta.update_teacher(MOMENTUM)
    return {k: v.detach() for k, v in terms.items()}


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
    opt = torch.optim.AdamW(meta.param_groups(), lr=LR, fused=fused or None)
    apply_optim_schedule(opt, LR, WD, LR)  # the official rows: the same lr / wd multipliers
    return meta, opt


def step_flops(cfg, batch_size: int, device: torch.device) -> float:
    """Nominal FLOPs of one step: fp32, drop path off, every token through every block, attention as its two
    batched products (on a CPU the explicit kernel at every length, so that the counter sees them; on a GPU the
    counter's SDPA formulas)."""
    cfg = cfg.model_copy(deep=True)
    cfg.student.drop_path_rate = 0.0
    meta, opt = build(cfg, device, fsdp=False)
    meta.last_block_rows = False
    batch = synthetic_batch(cfg, batch_size, device)
    limit, attention_mod.MATH_MAX_TOKENS = attention_mod.MATH_MAX_TOKENS, 1 << 30
    try:
        with FlopCounterMode(display=False) as counter:
            train_step(meta, opt, batch, contextlib.nullcontext)
    finally:
        attention_mod.MATH_MAX_TOKENS = limit
    return counter.get_total_flops()


@dataclass
class Row:
    model: str
    impl: str
    dtype: str
    packing: bool
    droppath: str
    batch: int
    flops: float
    run: Callable[[int], tuple[float, float]]  # steps -> (wall, CPU) seconds per step
    setup: Callable[[], None] = lambda: None  # flags a shared model reads, set before every timing
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)


def timer(step: Callable[[], object], device: torch.device) -> Callable[[int], tuple[float, float]]:
    def run(steps: int) -> tuple[float, float]:
        _sync(device)
        t, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        _sync(device)
        n = max(steps, 1)
        return (time.perf_counter() - t) / n, (time.process_time() - cpu) / n

    return run


def autocast_for(dtype: str, device: torch.device):
    return partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def official_rows(name: str, cfg, batch_size: int, flops: float, dtypes: list[str], device: torch.device,
                  fsdp: bool, mods: dict) -> list[Row]:
    """official fp32 + lvd per dtype, after the loss check (which starts both from the same weights)."""
    from bench.official_step import OfficialStep

    batch = synthetic_batch(cfg, batch_size, device)
    meta, opt = build(cfg, device, fsdp=False)
    official = OfficialStep(mods, cfg, ARCHS[cfg.student.arch], lr=LR, wd=WD).to(device).train()
    official.load_student({k: v.state_dict() for k, v in meta.student.items()})
    official.build_optimizer()
    check_losses(name, cfg, meta, opt, official, batch)
    droppath = f"{cfg.student.drop_path_rate:g}"
    rows = [Row(name, "official", "fp32", False, droppath, batch_size, flops,
                timer(lambda: official.step(batch, TEACHER_TEMP, MOMENTUM), device))]
    for dtype in dtypes:
        m, o = (meta, opt) if dtype == "fp32" and not fsdp else build(cfg, device, fsdp, dtype)
        step = partial(train_step, m, o, batch, autocast_for(dtype, device))
        rows.append(Row(name, "lvd", dtype, cfg.sequence_packing, droppath, batch_size, flops, timer(step, device)))
    return rows


def check_losses(name: str, cfg, meta, opt, official, batch) -> None:
    """Both implementations from the same weights on the same batch: every loss term of the first step must agree
    to LOSS_ATOL in fp32. A second step (after each one's clipping, AdamW and EMA update) is printed for information:
    the updates agree to float rounding, but KoLeo's nearest-neighbour choice can flip on such differences where
    class tokens are nearly equal (the demo's initialisation: LayerScale 1e-5)."""
    if cfg.student.drop_path_rate > 0:
        print(f"loss check {name}: skipped (drop path {cfg.student.drop_path_rate:g}: the two draw different paths)")
        return
    diffs = []
    for step in (1, 2):
        ours = train_step(meta, opt, batch, contextlib.nullcontext)
        theirs = {k: v.detach() for k, v in official.step(batch, TEACHER_TEMP, MOMENTUM).items()}
        assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
        diffs.append(max(abs(float(ours[k]) - float(theirs[k])) for k in ours))
        print(f"loss check {name} step {step} (fp32, lvd vs official): "
              + ", ".join(f"{k} {float(ours[k]):.6f} vs {float(theirs[k]):.6f}" for k in ours), flush=True)
    verdict = "OK" if diffs[0] <= LOSS_ATOL else "FAILED"
    print(f"loss check {name}: step 1 max |lvd - official| = {diffs[0]:.2e} ({verdict}, tolerance {LOSS_ATOL:g}); "
          f"step 2 {diffs[1]:.2e}")
    if verdict == "FAILED":
        raise SystemExit(f"the two steps disagree on {name}: the rows would not compare the same computation")


def variant_rows(name: str, cfg, batch_size: int, flops: float, dtypes: list[str], device: torch.device, fsdp: bool,
                 quick: bool) -> list[Row]:
    """Without --official: packing on/off x efficient/per-sample drop path, one shared model per dtype."""
    rows = []
    variants = [(True, True), (False, True), (True, False), (False, False)][:3 if quick else 4]
    for dtype in dtypes:
        meta, opt = build(cfg, device, fsdp, dtype)
        batch = synthetic_batch(cfg, batch_size, device)
        run = timer(partial(train_step, meta, opt, batch, autocast_for(dtype, device)), device)
        for packing, efficient in variants:
            def setup(packing=packing, efficient=efficient) -> None:
                cfg.sequence_packing = packing
                block_mod.EFFICIENT_DROP_PATH_MIN = 0.1 if efficient else 1.0  # 1.0: always per sample
            rows.append(Row(name, "lvd", dtype, packing, "subset" if efficient else "sample", batch_size, flops, run,
                            setup))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, default=None, help="a dinov2 checkout: compare with its step")
    parser.add_argument("--quick", action="store_true", help="without --official: 3 variants instead of 4")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    parser.add_argument("--models", default=None, help="comma-separated subset of vits,vitb,vitl,demo "
                        "(default: vits,demo on CPU; vits,vitb,vitl on GPU)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16 (this project)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step (default: ViT 2 on CPU / 32 on GPU; demo its recipe batch / 256)")
    parser.add_argument("--drop-path", type=float, default=None,
                        help="drop path rate (default: 0 with --official, so both do the same work; else 0.3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default: ViT 1, demo 4 on "
                        "CPU; 5 on GPU)")
    parser.add_argument("--rounds", type=int, default=3, help="timings per row, rows interleaved")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row before the rounds "
                        "(default: 1 on CPU, 3 on GPU)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.models = args.models or ("vits,vitb,vitl" if cuda else "vits,demo")
    for name, allowed in (("models", set(MODELS)), ("dtypes", {"fp32", "bf16"})):
        values = [v for v in getattr(args, name).split(",") if v]
        if not values or set(values) - allowed:
            parser.error(f"--{name}: comma-separated subset of {sorted(allowed)}, got {getattr(args, name)!r}")
        setattr(args, name, values)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    return args


def model_setup(key: str, args, cuda: bool) -> tuple[str, object, int, int]:
    """(row name, train config, batch, steps) of a model key."""
    cfg = load_config(None, MODELS[key]).train
    cfg.student.drop_path_uniform = True
    cfg.student.drop_path_rate = args.drop_path if args.drop_path is not None else (0.0 if args.official else 0.3)
    s, c = cfg.student, cfg.crops
    name = f"{'demo ' if key == 'demo' else ''}{s.arch}/{s.patch_size} {c.global_crops_size}+{c.local_crops_size}"
    demo = key == "demo"
    batch = args.batch or ((256 if cuda else cfg.batch_size_per_gpu) if demo else (32 if cuda else 2))
    steps = args.steps or (5 if cuda else (4 if demo else 1))
    return name, cfg, batch, steps


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 rows and peak: real fp32
    fsdp = cuda and _init_single_process_group()
    mods = None
    if args.official:
        from bench.official_step import import_official

        mods = import_official(args.official)
    print(describe_machine(device, args.threads) + f"; fsdp={fsdp}", flush=True)
    rows: list[Row] = []
    steps_of: dict[str, int] = {}
    for key in args.models:
        name, cfg, batch, steps = model_setup(key, args, cuda)
        flops = step_flops(cfg, batch, device)
        print(f"{name}: {flops / 1e9:.1f} GFLOP per step of {batch} images (nominal)", flush=True)
        steps_of[name] = steps
        rows += (official_rows(name, cfg, batch, flops, args.dtypes, device, fsdp, mods) if mods is not None
                 else variant_rows(name, cfg, batch, flops, args.dtypes, device, fsdp, args.quick))
    peaks = time_rows(rows, steps_of, args, device)
    print_table(rows, peaks)
    block_mod.EFFICIENT_DROP_PATH_MIN = 0.1


def time_rows(rows: list[Row], steps_of: dict[str, int], args, device: torch.device) -> dict[str, list[float]]:
    """Warm every row up, then `rounds` rounds: a peak reading per dtype, then every row once (rotated order)."""
    for row in rows:
        row.setup()
        row.run(args.warmup)
    max_n = 8192 if device.type == "cuda" else 1024
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks: dict[str, list[float]] = {d: [] for d in {r.dtype for r in rows}}
    for r in range(args.rounds):
        for d in peaks:
            peaks[d].append(peak_tflops(dtypes[d], device, max_n))
        for row in rows[r % len(rows):] + rows[:r % len(rows)]:
            row.setup()
            wall, cpu = row.run(steps_of[row.model])
            row.times.append(wall)
            row.cpu_times.append(cpu)
        print(f"round {r + 1}/{args.rounds} done ({', '.join(f'{d} peak {max(v):.3f}' for d, v in peaks.items())} "
              f"TFLOP/s; load average {os.getloadavg()[0]:.1f})", flush=True)
    return peaks


def print_table(rows: list[Row], peaks: dict[str, list[float]]) -> None:
    print("matmul peak (best of " + ", ".join(f"{len(v)} readings: {d} {max(v):.3f} TFLOP/s, readings "
                                               f"{min(v):.3f}-{max(v):.3f}" for d, v in peaks.items()) + ")")
    header = (f"{'model':26} {'impl':8} {'dtype':>5} {'packing':>7} {'droppath':>8} {'batch':>5} {'img/s':>8} "
              f"{'step ms':>9} {'spread ms':>13} {'TFLOP/s':>8} {'MFU':>6} {'ratio':>6} {'cpu ms':>8} {'cpu ratio':>9}")
    print(header)
    print("-" * len(header))
    official = {r.model: r for r in rows if r.impl == "official"}
    for row in rows:
        dt, cpu = statistics.median(row.times), statistics.median(row.cpu_times)
        tflops = row.flops / dt / 1e12
        base = official.get(row.model)
        ratio = (f"{statistics.median(base.times) / dt:>6.2f} {cpu * 1e3:>8.0f} "
                 f"{statistics.median(base.cpu_times) / cpu:>9.2f}") if base else f"{'-':>6} {cpu * 1e3:>8.0f} {'-':>9}"
        spread = f"{min(row.times) * 1e3:.0f}-{max(row.times) * 1e3:.0f}"
        print(f"{row.model:26} {row.impl:8} {row.dtype:>5} {row.packing!s:>7} {row.droppath:>8} {row.batch:>5} "
              f"{row.batch / dt:>8.2f} {dt * 1e3:>9.0f} {spread:>13} {tflops:>8.3f} "
              f"{tflops / max(peaks[row.dtype]):>6.1%} {ratio}", flush=True)


def _init_single_process_group() -> bool:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    return True


if __name__ == "__main__":
    main()
