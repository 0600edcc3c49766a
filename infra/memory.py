"""Memory: what a run may use (the machine's, or its cgroup's limit), whether the kernel's out-of-memory killer ended
a process, and handing freed heap memory back to the operating system between the steps of a long run.

glibc's malloc keeps freed blocks of its heap for reuse: after a step frees gigabytes of arrays (NumPy and torch
allocate through malloc), the process's resident memory stays near the step's peak, and the next step's peak comes
on top. ``malloc_trim(0)`` returns every free page of the heap. Measured on the curation benchmark
(``bench/curate_scale.py``, 1M pool after the 250k one in one process): resident heap after the dedup graph 1.73
-> 0.95 GiB, after retrieval 1.89 -> 0.94 GiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass
from pathlib import Path

from infra.cgroup import folders


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``); False where the C library has none."""
    lib = _libc()
    return bool(lib is not None and lib.malloc_trim(0))


# --- the memory a run may use, and the kernel's out-of-memory kills -------------------------------------------------

GIB = 2**30


def gib(n: int) -> str:
    """`1.3 GiB` (`0.2 GiB`)."""
    return f"{n / GIB:.1f} GiB"


# cgroup v1 writes "no limit" as the largest page-aligned count (9223372036854771712); anything at or above the
# machine's memory does not bind either.
_V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class MemoryBudget:
    bytes: int  # what this process and its children may use: the machine's memory or the cgroup's limit, the smaller
    machine: int  # MemTotal
    limit: int | None  # the smallest cgroup memory limit along the process's cgroup path; None: none binds
    limit_file: str | None  # where that limit was read

    def describe(self) -> str:
        """`23.4 GiB memory (no cgroup limit)` or `4.0 GiB memory (cgroup limit: /sys/fs/cgroup/memory.max; machine
        23.4 GiB)`, for the console and the run's events."""
        if self.limit is None:
            return f"{gib(self.bytes)} memory (no cgroup limit)"
        return f"{gib(self.bytes)} memory (cgroup limit: {self.limit_file}; machine {gib(self.machine)})"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def machine_memory(proc: Path = Path("/proc")) -> int:
    """MemTotal of /proc/meminfo in bytes (0 where it cannot be read)."""
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def read_limit(proc: Path = Path("/proc")) -> tuple[int, str] | None:
    """The smallest memory limit along the process's cgroup path (v2 `memory.max`, v1 `memory.limit_in_bytes`) in
    bytes, and the file it was read from; None where none is set."""
    found = []
    for fstype, folder in folders("memory", proc):
        file = folder / ("memory.max" if fstype == "cgroup2" else "memory.limit_in_bytes")
        limit = _read_int(file)  # (v2's "max" is not a number: no limit)
        if limit is not None and limit < _V1_UNLIMITED:
            found.append((limit, str(file)))
    return min(found) if found else None


def memory_budget(proc: Path = Path("/proc")) -> MemoryBudget:
    machine = machine_memory(proc)
    limit = read_limit(proc)
    if limit is None or (machine and limit[0] >= machine):
        return MemoryBudget(machine, machine, None, None)
    return MemoryBudget(limit[0], machine, limit[0], limit[1])


def _oom_count(file: Path) -> int | None:
    try:
        for line in file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return None


def oom_kills(proc: Path = Path("/proc")) -> tuple[str, int] | None:
    """The kernel's count of processes its out-of-memory killer ended, for this process's own cgroup (v2
    `memory.events.local`, else `memory.events`; v1 `memory.oom_control`: counted in the victim's own cgroup, whether
    a cgroup limit or the machine ran out), or the machine's (`/proc/vmstat`) for a process outside any memory
    cgroup: (file, count), None where the kernel writes neither. Read before and after, it tells whether a process
    of this cgroup that vanished meanwhile was killed for memory; the own cgroup's, not its parents', so that kills
    in a sibling (another container of the pod, another job) are not taken for this one's."""
    for fstype, folder in folders("memory", proc):
        names = ("memory.events.local", "memory.events") if fstype == "cgroup2" else ("memory.oom_control",)
        if not any((folder / n).is_file() for n in names):
            continue  # (a v2 folder without the memory controller enabled)
        for name in names:
            count = _oom_count(folder / name)
            if count is not None:
                return str(folder / name), count
        break
    count = _oom_count(proc / "vmstat")
    return (str(proc / "vmstat"), count) if count is not None else None


def oom_kills_since(before: tuple[str, int] | None, now: tuple[str, int] | None = None) -> tuple[int, str] | None:
    """(kills, file) where the counter :func:`oom_kills` read `before` rose since; None where it did not."""
    now = oom_kills() if now is None else now
    if before is None or now is None or now[0] != before[0] or now[1] <= before[1]:
        return None
    return now[1] - before[1], now[0]


def release_stage_memory() -> None:
    """Before a stage, in the flow's process: the models earlier stages (and the start-up checks) kept for their
    shards (`infra.workers.process_cached`) let go, collected, and the free heap returned, so this stage's peak does
    not come on top of theirs. Measured (docs/guarantees.md, "Killed, or out of memory"): the NSFW models stayed
    through faces, dedup and embedding."""
    import gc

    from infra.workers import release_cached

    release_cached()
    gc.collect()
    release_free_heap()


class PeakMemory:
    """The peak resident memory of this process and every process below it (Dask and data-loader workers, training
    processes, Prefect's embedded server) while the block runs, sampled every `interval` seconds by a thread: what a
    machine or a container limit must give the block. Shared pages (the libraries every process maps) count once per
    process, so the sum may exceed what the kernel charges; a peak shorter than the interval may be missed."""

    def __init__(self, interval: float = 0.25):
        import threading

        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="lvd-peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self.peak = tree_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_rss())


def tree_rss() -> int:
    """Resident bytes of this process and its descendants (0 where psutil cannot read them)."""
    import psutil

    try:
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


# Held back from the run's memory when a pool is sized from it: what the sizes per task do not count (allocator
# slack, a task's inputs and outputs besides its batch, the page cache the kernel charges to a cgroup).
RESERVE_FRACTION, RESERVE_MIN = 0.10, 256 * 2**20


def memory_cap(per_task: int, budget: MemoryBudget, used: int) -> int:
    """How many tasks that each hold `per_task` bytes fit at once in what the run may use (`budget`: its cgroup limit,
    or the machine's memory, `memory_budget`) beyond what its processes hold now (`used`: `tree_rss`), less a reserve:
    at least 1."""
    free = budget.bytes - used - max(RESERVE_MIN, int(RESERVE_FRACTION * budget.bytes))
    return max(1, free // max(1, per_task))
