"""Mixed precision by measured capability: bf16 autocast only where bf16 matmuls are native.

On a CPU without AMX or AVX512-BF16, bf16 matmuls are emulated and slower than fp32 (measured on the 2-core CI
host: about 11 GFLOP/s bf16 against 39 fp32), so ``auto`` resolves to fp32 there and to bf16 on AMX hosts and
bf16-capable GPUs.
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]


def native_bf16(device_type: str = "cpu") -> bool:
    if device_type in ("cuda", "gpu"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve(precision: str, device_type: str = "cpu") -> Literal["bf16", "fp32"]:
    """``auto`` -> bf16 where native on ``device_type``, else fp32; ``bf16`` / ``fp32`` as given."""
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision  # type: ignore[return-value]
