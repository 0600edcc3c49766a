"""Activation memory and step time of the DINOv2 training step with and without activation checkpointing
(`train.activation_checkpointing`), measured in the same run; the ratios are against the run without it.

Memory: the bytes autograd keeps for the backward pass during one student + teacher forward (every tensor saved for
backward, counted once per storage, parameters excluded; a checkpointed block's input is among them, saved by
PyTorch's non-reentrant checkpoint): what activation checkpointing trades for recomputation.
On a CUDA host also the allocator's peak over a whole step (`torch.cuda.max_memory_allocated`). Time: the median of
`--rounds` timings of `--steps` full steps (forward, backward, clipping, AdamW, EMA), the two variants interleaved.

    python bench/activation_memory.py                       # ViT-S/14 224+98, 2 global + 8 local crops
    python bench/activation_memory.py --model demo --batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train_step import VIT_S, _sync, build, synthetic_batch, train_step
from infra.config.schema import load_config
from training.recipes import DEMO, overrides


def saved_bytes(meta, batch) -> int:
    """Bytes saved for backward by one forward of the losses (distinct storages, parameters excluded)."""
    params = {p.data_ptr() for p in meta.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms, _ = meta.forward_losses(batch, teacher_temp=0.04)
    del terms
    return sum(seen.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["vits", "demo"], default="vits")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 32 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 5 on GPU, 1 on CPU)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(None, VIT_S if args.model == "vits" else overrides(DEMO)).train
    batch_size = args.batch or (32 if cuda else 2)
    steps = args.steps or (5 if cuda else 1)
    meta, opt = build(cfg, device, fsdp=False)
    batch = synthetic_batch(cfg, batch_size, device)
    backbone = meta.student["backbone"]
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} ({args.threads} threads); {args.model} "
          f"{cfg.student.arch}/{cfg.student.patch_size} {cfg.crops.global_crops_size}+{cfg.crops.local_crops_size}, "
          f"{batch_size} images x (2 + {cfg.crops.local_crops_number}) crops, fp32")
    rows: dict[bool, dict[str, float]] = {}
    times: dict[bool, list[float]] = {False: [], True: []}
    for on in (False, True):
        backbone.activation_checkpointing = on
        rows[on] = {"saved": saved_bytes(meta, batch)}
        opt.zero_grad(set_to_none=True)
        train_step(meta, opt, batch, contextlib.nullcontext)  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            train_step(meta, opt, batch, contextlib.nullcontext)
            rows[on]["peak"] = torch.cuda.max_memory_allocated()
    for r in range(args.rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            backbone.activation_checkpointing = on
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                train_step(meta, opt, batch, contextlib.nullcontext)
            _sync(device)
            times[on].append((time.perf_counter() - t) / steps)
    base = rows[False]
    header = f"{'checkpointing':>13} {'saved MiB':>10} {'x':>6} {'peak MiB':>9} {'x':>6} {'step ms':>9} {'x':>6}"
    print(header)
    print("-" * len(header))
    for on in (False, True):
        row, dt = rows[on], statistics.median(times[on])
        peak = f"{row['peak'] / 2**20:>9.0f} {row['peak'] / base['peak']:>6.2f}" if cuda else f"{'-':>9} {'-':>6}"
        print(f"{'on' if on else 'off':>13} {row['saved'] / 2**20:>10.1f} {row['saved'] / base['saved']:>6.2f} {peak} "
              f"{dt * 1e3:>9.0f} {dt / statistics.median(times[False]):>6.2f}")


if __name__ == "__main__":
    main()
