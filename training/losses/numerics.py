"""Loss numerics: low-precision inputs are upcast to fp32; fp32/fp64 pass through (tests run in float64)."""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in LOW_PRECISION else t
