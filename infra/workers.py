"""What a stage's shard task needs in whichever process runs it (the flow's, or a Dask/Ray worker's): its model,
built once per process and reused for every shard, and on a multi-GPU host its own GPU."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_CACHE: dict[str, Any] = {}
_LOCK = threading.Lock()


def process_cached(key: str, build: Callable[[], T]) -> T:
    """The object ``build()`` made for ``key`` in this process (built on first use). ``key`` must identify it
    completely (config and weights), since a long-lived worker keeps it for the next stage or run."""
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def release_cached() -> int:
    """Forget every object :func:`process_cached` holds (the flow's own process, between stages: the models of one
    stage need not stay beside the next one's); how many there were. A long-lived Dask worker keeps its own."""
    with _LOCK:
        n = len(_CACHE)
        _CACHE.clear()
    return n


def worker_gpu() -> int | None:
    """The GPU of this Dask worker on a multi-GPU host: a worker named by an integer (a local cluster's are 0, 1, ...)
    takes GPU ``name % count``; None outside a Dask worker, without CUDA, or with one GPU."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker
        return None
    return name % torch.cuda.device_count() if isinstance(name, int) else None


def claim_worker_gpu() -> int | None:
    """Make this Dask worker's GPU (:func:`worker_gpu`) the process's current CUDA device, so that a model built for
    device "cuda" afterwards lands on it; returns that GPU (None: nothing changed). Call it before building a model."""
    gpu = worker_gpu()
    if gpu is not None:
        import torch

        torch.cuda.set_device(gpu)
    return gpu
