"""Mixed precision by measured capability: bf16 autocast only where bf16 matmuls are fast.

GPUs: bf16 where CUDA supports it. CPUs: the instruction set decides first, a measurement second. Without AMX or
AVX512-BF16, bf16 matmuls are emulated and slower than fp32 (measured on a 2-core AVX2 host: about 11 GFLOP/s bf16
against 39 fp32), so ``auto`` is fp32 there without measuring. With either flag, one product of 512 x 512 matrices is
timed in both dtypes (on one thread, best of 7, ~0.1 s once per process): ``auto`` is bf16 when bf16 is at least
``BF16_MIN_SPEEDUP`` times faster. Measured on the 2-core hosts: AMX (Sapphire Rapids) ~6-11x; AMD EPYC Zen 4
(AVX512-BF16, no AMX) 1.9-2.1x, where the whole ViT-S/14 training step runs 1.65x faster in bf16 and the demo's 1.75x
(docs/training.md).
"""

from __future__ import annotations

import functools
import time
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]
BF16_MIN_SPEEDUP = 1.3  # below this, autocast's casts eat what the faster products save


def cpu_bf16_flags() -> bool:
    """The CPU has bf16 matmul instructions (AMX tiles or AVX512-BF16)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def matmul_seconds(dtypes: tuple[torch.dtype, ...], n: int = 512, reps: int = 5) -> list[float]:
    """Per dtype, the best time of one n x n x n product through `F.linear` (the op of the model's layers) on the
    CPU; the dtypes alternate, so that a busy machine slows them alike."""
    mats = [(torch.randn(n, n).to(d), torch.randn(n, n).to(d)) for d in dtypes]
    best = [float("inf")] * len(dtypes)
    for r in range(reps + 1):  # the first round warms up (kernel selection, packing)
        for i, (a, b) in enumerate(mats):
            t = time.perf_counter()
            torch.nn.functional.linear(a, b)
            if r:
                best[i] = min(best[i], time.perf_counter() - t)
    return best


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of the probe product on this CPU (measured once per process, on one thread: the
    instructions' speed, which a busy machine's other processes disturb less than a multi-threaded product)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32, bf16 = matmul_seconds((torch.float32, torch.bfloat16), reps=7)
    finally:
        torch.set_num_threads(threads)
    return fp32 / bf16


def native_bf16(device_type: str = "cpu") -> bool:
    if device_type in ("cuda", "gpu"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_bf16_flags() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def resolve(precision: str, device_type: str = "cpu") -> Literal["bf16", "fp32"]:
    """``auto`` -> bf16 where native on ``device_type``, else fp32; ``bf16`` / ``fp32`` as given."""
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision  # type: ignore[return-value]
