"""infra.memory: freed heap memory goes back to the OS; the memory a run may use (the machine's, or its cgroup's
limit) and the kernel's out-of-memory kill counters, read from trees written in the kernel's formats (a real cgroup
with a limit and a real kill: tests/infra/test_reaper.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from infra.memory import memory_budget, oom_kills, oom_kills_since, release_free_heap


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_freed_small_blocks_are_returned() -> None:
    blocks = [np.ones(12_000) for _ in range(4000)]  # 96 KB each: below malloc's mmap threshold, on the heap
    keep = blocks[-1]  # one live block at the top of the heap keeps the freed ones below it from being trimmed
    del blocks
    before = rss_anon()
    assert release_free_heap()
    assert before - rss_anon() > 200 * 2**20  # most of the ~380 MB freed
    assert keep.sum() == 12_000


# --- the memory budget and the out-of-memory kill counters, on cgroup trees written in the kernel's formats --------


def _tree(tmp: Path, mounts: list[tuple[str, str, str, str]], cgroup: str, meminfo_kb: int = 24_000_000) -> Path:
    from tests.infra.test_cpus import fake_proc

    proc = fake_proc(tmp, mounts, cgroup)
    (proc / "meminfo").write_text(f"MemTotal:       {meminfo_kb} kB\nMemFree:        1000 kB\n")
    (proc / "vmstat").write_text("pgfault 10\noom_kill 7\n")
    return proc


def _put(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text + "\n")


def test_a_v2_pods_limit_binds_its_container_and_the_own_cgroups_kills_are_counted(tmp_path: Path) -> None:
    """A Kubernetes pod's limit on the pod's cgroup binds the container below it (`max` there); the kill counter is
    the container's own (`memory.events.local`: a sibling container's kills are not this one's)."""
    proc = _tree(tmp_path, [("/", "cg", "cgroup2", "rw,nsdelegate")], "0::/kubepods/pod1/ctr\n")
    ctr = tmp_path / "cg" / "kubepods" / "pod1" / "ctr"
    _put(tmp_path / "cg" / "kubepods" / "pod1", memory__max=str(4 * 2**30), memory__events="oom 3\noom_kill 3")
    _put(ctr, memory__max="max", memory__events="oom 1\noom_kill 2", memory__events__local="oom 1\noom_kill 1")
    budget = memory_budget(proc)
    pod_max = str(tmp_path / "cg" / "kubepods" / "pod1" / "memory.max")
    assert (budget.bytes, budget.limit, budget.limit_file, budget.machine) == (4 * 2**30, 4 * 2**30, pod_max,
                                                                               24_000_000 * 1024)  # fmt: skip
    assert budget.describe() == f"4.0 GiB memory (cgroup limit: {pod_max}; machine 22.9 GiB)"
    assert oom_kills(proc) == (str(ctr / "memory.events.local"), 1)
    (ctr / "memory.events.local").unlink()  # an older kernel: the hierarchical count
    assert oom_kills(proc) == (str(ctr / "memory.events"), 2)
    assert oom_kills_since((str(ctr / "memory.events"), 1), oom_kills(proc)) == (1, str(ctr / "memory.events"))
    assert oom_kills_since((str(ctr / "memory.events"), 2), oom_kills(proc)) is None
    assert oom_kills_since(None, oom_kills(proc)) is None


def test_v1_unlimited_and_limits_above_the_machine_do_not_bind_and_the_machines_counter_is_the_fallback(
        tmp_path: Path) -> None:
    """cgroup v1 writes "no limit" as 9223372036854771712; a limit above the machine's memory binds nothing either.
    Outside any memory cgroup (no counter file) the machine's `/proc/vmstat` counts the kills."""
    proc = _tree(tmp_path, [("/", "mem", "cgroup", "rw,memory")], "4:memory:/job/42\n2:cpu:/\n")
    job = tmp_path / "mem" / "job" / "42"
    _put(tmp_path / "mem", memory__limit_in_bytes="9223372036854771712", memory__oom_control="oom_kill_disable 0")
    _put(tmp_path / "mem" / "job", memory__limit_in_bytes=str(64 * 2**30))  # above the machine's 22.9 GiB
    _put(job, memory__limit_in_bytes="9223372036854771712",
         memory__oom_control="oom_kill_disable 0\nunder_oom 0\noom_kill 5")
    budget = memory_budget(proc)
    assert (budget.bytes, budget.limit, budget.limit_file) == (24_000_000 * 1024, None, None)
    assert budget.describe() == "22.9 GiB memory (no cgroup limit)"
    assert oom_kills(proc) == (str(job / "memory.oom_control"), 5)
    _put(job, memory__limit_in_bytes=str(2**30))
    assert memory_budget(proc).limit_file == str(job / "memory.limit_in_bytes")
    for f in job.iterdir():
        f.unlink()
    for f in (tmp_path / "mem").glob("memory.*"):
        f.unlink()
    assert oom_kills(proc) == (str(proc / "vmstat"), 7)


def test_the_peak_memory_of_a_stage_counts_its_child_processes_and_is_recorded_and_shown(tmp_path: Path) -> None:
    """A stage whose work holds 256 MiB in a child process (as a Dask or data-loader worker would) for a second:
    the peak recorded in its `completed` event is at least what the run's processes held before plus that, and `lvd
    status` shows the attempt's highest peak with its stage."""
    import subprocess

    from infra.config import load_config
    from infra.history import attempts_from, describe
    from infra.memory import gib, tree_rss
    from infra.run import RunDir
    from infra.stage import StageResult, StageSpec, run_stage
    from infra.summary import format_summary

    code = "import time\nx = b'x' * (256 * 2**20)\nprint('held', flush=True)\ntime.sleep(1.0)"

    def fn(ctx):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "held\n"
        child.wait()
        return StageResult(counts={"kept": 1})

    run = RunDir(tmp_path, "r")
    run.log_event("launched")
    before = tree_rss()
    run_stage(StageSpec("ingest", ("ingest",), (), fn), run, load_config(None))
    (done,) = [e for e in run.events() if e["event"] == "completed"]
    assert done["peak_memory"] >= before + 256 * 2**20
    (row,) = describe(attempts_from(run.events()))
    assert (row["what"], row["peak"]) == ("ran ingest", f"{gib(done['peak_memory'])} (ingest)")
    text = format_summary({"run_id": "r", "path": "p", "stages": [], "attempts": [row]})
    assert text.splitlines()[-1] == f"     peak memory {gib(done['peak_memory'])} (ingest)"


def test_a_pool_sized_by_memory_holds_what_fits_beyond_what_is_in_use_and_a_reserve():
    """`memory_cap`: tasks of `per_task` bytes that fit in the run's memory less what its processes hold and a reserve
    (10 %, at least 256 MiB); `shards_and_threads` keeps a stage's batches in flight under it, shards first."""
    from infra.cpus import cpus, shards_and_threads
    from infra.memory import MemoryBudget, memory_cap

    gib_ = 2**30
    sixteen = MemoryBudget(16 * gib_, 64 * gib_, 16 * gib_, "memory.max")
    # 16 GiB, 1.6 GiB reserve, 2 GiB in use: 12.4 GiB for batches of 384 MiB.
    assert memory_cap(384 * 2**20, sixteen, used=2 * gib_) == int((16 - 1.6 - 2) * gib_) // (384 * 2**20) == 33
    assert memory_cap(384 * 2**20, MemoryBudget(gib_, gib_, None, None), used=gib_) == 1  # none fits: still one
    assert memory_cap(2**20, MemoryBudget(gib_, gib_, None, None), used=0) == 1024 - 256  # the 256 MiB floor
    n = cpus()
    assert shards_and_threads(100, 64) == (64, max(1, n // 64))
    assert shards_and_threads(100, 64, cap=12) == (12, 1)
    assert shards_and_threads(1, "auto", cap=None) == (1, n)
    assert shards_and_threads(1, "auto", cap=1) == (1, 1)
    assert shards_and_threads(3, 3, cap=7) == (3, min(max(1, n // 3), 2))
