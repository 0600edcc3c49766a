"""The CPUs this process may use: its affinity (taskset, a Slurm or Kubernetes cpuset) and its cgroup's CPU quota
(`docker run --cpus`, a Kubernetes CPU limit), whichever is smaller.

Thread pools size themselves from it: the per-shard fan-out (`run.workers`, `ingest.processes` when `auto`), the
onnxruntime sessions that would otherwise open one thread per core of the host, and the OpenMP and BLAS pools of
torch, FAISS and numpy (:func:`limit_native_threads`). torch and FAISS follow the affinity on their own, but no
library reads the quota: in a container limited to 2 CPUs on a 64-core host they would start 32 or 64 threads
each, which the kernel then throttles to the quota.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from infra.cgroup import folders

T, R = TypeVar("T"), TypeVar("R")

# Environment variables the native thread pools read when they load (libgomp: torch, FAISS; MKL; OpenBLAS: numpy).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class CpuBudget:
    cpus: int  # what thread pools size themselves to: min(affinity, ceil(quota)), at least 1
    affinity: int  # CPUs in the process's affinity mask
    quota: float | None  # the cgroup's CPU quota in CPUs (the smallest along its path), None: no quota
    quota_file: str | None  # where the binding quota was read

    def describe(self) -> str:
        """`2 CPUs (affinity 64, cgroup quota 2 CPUs: /sys/fs/cgroup/cpu.max)`, for the console and the run's events."""
        if self.quota is None:
            return f"{self.cpus} CPU{'s' if self.cpus != 1 else ''} (affinity {self.affinity}, no cgroup quota)"
        return (f"{self.cpus} CPU{'s' if self.cpus != 1 else ''} (affinity {self.affinity}, cgroup quota "
                f"{self.quota:g} CPU{'s' if self.quota != 1 else ''}: {self.quota_file})")  # fmt: skip


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, *period = (folder / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period[0] if period else 100_000)


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def read_quota(proc: Path = Path("/proc")) -> tuple[float, str] | None:
    """The smallest CPU quota along the process's cgroup path (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), in CPUs, and
    the file it was read from; None where there is none (or no cgroup file system is mounted)."""
    found: list[tuple[float, str]] = []
    for fstype, folder in folders("cpu", proc):
        quota = (_v2_quota if fstype == "cgroup2" else _v1_quota)(folder)
        if quota is not None:
            found.append((quota, str(folder / ("cpu.max" if fstype == "cgroup2" else "cpu.cfs_quota_us"))))
    return min(found) if found else None


def cpu_budget(proc: Path = Path("/proc")) -> CpuBudget:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = read_quota(proc)
    if quota is None:
        return CpuBudget(max(1, affinity), affinity, None, None)
    return CpuBudget(max(1, min(affinity, math.ceil(quota[0] - 1e-9))), affinity, quota[0], quota[1])


@lru_cache(maxsize=1)
def budget() -> CpuBudget:
    """This process's budget, read once."""
    return cpu_budget()


def cpus() -> int:
    return budget().cpus


def resolve(value: int | str) -> int:
    """A configured pool width: a number as given, `auto` as this process's CPUs."""
    return cpus() if value == "auto" else int(value)


def threads_per_task(tasks: int, width: int | str) -> int:
    """Threads for each of ``tasks`` tasks run ``width`` at a time (`auto`: the CPUs): the CPUs shared by the tasks
    in flight, at least 1. A stage of one shard on 8 CPUs gives the shard 8; of 8 shards or more, 1 each."""
    return max(1, cpus() // max(1, min(tasks, resolve(width))))


def shards_and_threads(tasks: int, width: int | str, cap: int | None = None) -> tuple[int, int]:
    """Shards in flight and threads for each (`threads_per_task`), with at most `cap` threads busy in all (None: no
    cap): what the memory leaves for a stage whose every thread holds a batch (`infra.memory.memory_cap`)."""
    shards = max(1, min(tasks, resolve(width)))
    threads = threads_per_task(tasks, width)
    if cap is None:
        return shards, threads
    shards = min(shards, cap)
    return shards, max(1, min(threads, cap // shards))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, ahead: int | None = None) -> Iterator[R]:
    """``fn`` over ``items`` on ``threads`` threads, results in the items' order; at most ``ahead`` (2 x ``threads``)
    items in flight, so memory holds that many, not the iterable. One thread: a plain map in the caller's thread."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        window: deque[Future[R]] = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= (ahead or 2 * threads):
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def limit_native_threads() -> CpuBudget:
    """Where a quota, not the affinity, binds: the OpenMP and BLAS pools of this process and of the processes it
    starts (Dask workers, torchrun, data loaders) sized to it, unless the environment already names a size. Call it
    before torch, FAISS or numpy load (they read the variables once); torch's count is lowered too if it has."""
    b = budget()
    if b.cpus >= b.affinity:
        return b  # the libraries follow the affinity themselves
    for var in THREAD_ENV:
        os.environ.setdefault(var, str(b.cpus))
    import sys

    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.get_num_threads() > b.cpus:
            torch.set_num_threads(b.cpus)
    return b
