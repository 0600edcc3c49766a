"""Seeds derived from integers, so that every random draw of a run is a function of (seed, step, rank, ...)."""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): stable across processes and Python versions."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def reseed(*parts: int) -> None:
    """Seed the global torch RNGs (drop path and anything else stochastic in the model) from integers, e.g.
    (seed, step, rank): each step's randomness is then independent of what ran before, so resume is exact.
    `torch.default_generator` is seeded directly because `torch.manual_seed` also queues lazy CUDA/XPU seeding
    with a formatted stack trace per call (~1 ms)."""
    s = mix_seed(*parts)
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed(s)
