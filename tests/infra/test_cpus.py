"""The CPUs a process may use (infra.cpus): its affinity and its cgroup's CPU quota, read from the files the kernel
writes (proc(5) mountinfo and cgroup, cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, v2 `cpu.max`). The
parsing is checked on cgroup trees written here in the kernel's formats; the affinity on this process's children;
the quota on a real cgroup where this machine lets the test create one (as root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flows.fanout import task_runner
from infra.config.curation import EmbedConfig
from infra.config.ingest import IngestConfig
from infra.config.run import RunConfig
from infra.cpus import cpu_budget, cpus, ordered_map, read_quota, resolve, threads_per_task

REPO = Path(__file__).resolve().parents[2]


def fake_proc(tmp: Path, mounts: list[tuple[str, str, str, str]], cgroup: str) -> Path:
    """/proc/self/{mountinfo,cgroup} naming mount points under `tmp`: (root, mount point, fstype, super options)."""
    self = tmp / "proc" / "self"
    self.mkdir(parents=True)
    lines = [f"{30 + i} 23 0:{40 + i} {root} {tmp / point} rw,nosuid - {fstype} {fstype} {opts}"
             for i, (root, point, fstype, opts) in enumerate(mounts)]  # fmt: skip
    lines.insert(0, "22 1 8:1 / / rw,relatime - ext4 /dev/root rw")
    (self / "mountinfo").write_text("\n".join(lines) + "\n")
    (self / "cgroup").write_text(cgroup)
    return tmp / "proc"


def put(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1) if name.startswith("cpu_") else folder / name).write_text(text + "\n")


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path):
    """A pod's limit set on its parent binds its container (`max` there); `max` everywhere: no quota."""
    proc = fake_proc(tmp_path, [("/", "cg", "cgroup2", "rw,nsdelegate")], "0::/kubepods/pod1/ctr\n")
    put(tmp_path / "cg", cpu_max="max 100000")
    put(tmp_path / "cg" / "kubepods", cpu_max="max 100000")
    put(tmp_path / "cg" / "kubepods" / "pod1", cpu_max="150000 100000")
    put(tmp_path / "cg" / "kubepods" / "pod1" / "ctr", cpu_max="max 100000")
    assert read_quota(proc) == (1.5, str(tmp_path / "cg" / "kubepods" / "pod1" / "cpu.max"))
    budget = cpu_budget(proc)
    assert (budget.cpus, budget.quota) == (min(2, budget.affinity), 1.5)  # ceil(1.5)
    n = budget.cpus
    assert budget.describe() == (f"{n} CPU{'s' if n > 1 else ''} (affinity {budget.affinity}, cgroup quota 1.5 CPUs: "
                                 f"{tmp_path / 'cg' / 'kubepods' / 'pod1' / 'cpu.max'})")  # what `lvd run` prints
    put(tmp_path / "cg" / "kubepods" / "pod1", cpu_max="max 100000")
    assert read_quota(proc) is None
    assert cpu_budget(proc).cpus == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota_on_a_bind_mounted_hierarchy(tmp_path):
    """Docker without a cgroup namespace: the mount's root is the container's own cgroup (`/docker/abc`), the
    process's path repeats it; the cpu controller shares its hierarchy with cpuacct; -1 means no limit."""
    proc = fake_proc(tmp_path, [("/docker/abc", "sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
                                ("/docker/abc", "sys/fs/cgroup/memory", "cgroup", "rw,memory")],
                     "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc/inner\n0::/\n")  # fmt: skip
    base = tmp_path / "sys" / "fs" / "cgroup" / "cpu,cpuacct"
    put(base, cpu_cfs_quota_us="50000", cpu_cfs_period_us="100000")
    put(base / "inner", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    assert read_quota(proc) == (0.5, str(base / "cpu.cfs_quota_us"))
    assert cpu_budget(proc).cpus == 1  # at least one
    put(base / "inner", cpu_cfs_quota_us="300000", cpu_cfs_period_us="100000")
    assert read_quota(proc) == (0.5, str(base / "cpu.cfs_quota_us"))  # the parent's still binds
    # a process whose cgroup the mount does not show (a sibling whose name extends the mount's root): nothing read
    (proc / "self" / "cgroup").write_text("4:cpu,cpuacct:/docker/abcdef\n")
    put(base / "def", cpu_cfs_quota_us="10000", cpu_cfs_period_us="100000")
    assert read_quota(proc) is None


def test_hybrid_hierarchy_takes_the_smaller_quota_and_odd_paths(tmp_path):
    """v1 and v2 both mounted (systemd's hybrid layout): the smaller quota binds; a mount point with a space
    (mountinfo writes it as \\040); no cgroup file system at all: no quota."""
    proc = fake_proc(tmp_path, [("/", "cg/cpu", "cgroup", "rw,cpu"), ("/", "cg/uni\\040fied", "cgroup2", "rw")],
                     "5:cpu:/job\n0::/job\n")  # fmt: skip
    put(tmp_path / "cg" / "cpu" / "job", cpu_cfs_quota_us="400000", cpu_cfs_period_us="100000")
    put(tmp_path / "cg" / "uni fied" / "job", cpu_max="250000 100000")
    assert read_quota(proc) == (2.5, str(tmp_path / "cg" / "uni fied" / "job" / "cpu.max"))
    (proc / "self" / "mountinfo").write_text("22 1 8:1 / / rw,relatime - ext4 /dev/root rw\n")
    assert read_quota(proc) is None


def _child(code: str, prefix: str = "") -> dict:
    """`code` (which prints one JSON line) in a fresh interpreter, after the shell `prefix` (e.g. joining a cgroup)."""
    env = {**{k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}, "PYTHONPATH": str(REPO)}
    out = subprocess.run(["bash", "-c", f'{prefix}exec "{sys.executable}" -c "$0"', code], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


BUDGET_CODE = """
import json, os
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
from infra.cpus import budget, limit_native_threads
b = limit_native_threads()
import torch
print(json.dumps({"cpus": b.cpus, "affinity": b.affinity, "torch": torch.get_num_threads(),
                  "omp": os.environ.get("OMP_NUM_THREADS")}))
"""


def test_affinity_is_followed_and_the_libraries_left_to_it():
    """One CPU by affinity (taskset): the budget is 1, and the thread variables are left alone (torch and FAISS
    read the affinity themselves)."""
    got = _child(BUDGET_CODE)
    assert got == {"cpus": 1, "affinity": 1, "torch": 1, "omp": None}


def test_auto_widths_are_the_budget():
    """`run.workers`, `ingest.processes` and `embed.decode_threads` default to `auto`: the CPUs this process may use;
    a number is taken as given."""
    assert (RunConfig().workers, IngestConfig().processes, EmbedConfig().decode_threads) == ("auto",) * 3
    assert resolve("auto") == cpus() == cpu_budget().cpus
    assert resolve(3) == 3 and RunConfig(workers=3).workers == 3
    with pytest.raises(ValueError, match="workers"):
        RunConfig(workers=0)
    runner = task_runner(RunConfig(), resolve(RunConfig().workers))
    assert runner._max_workers == cpus()


def _cgroup_with_quota(cpus_quota: float) -> tuple[Path, str]:
    """A real cgroup with a CPU quota (v1 `cpu` hierarchy, or v2 at the root), its folder and the file that binds;
    skips where the machine does not let this test create one."""
    name = f"lvd-test-{uuid.uuid4().hex[:8]}"
    v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
    try:
        if (v1 / "cpu.cfs_period_us").is_file():
            folder = v1 / name
            folder.mkdir()
            (folder / "cpu.cfs_quota_us").write_text(str(int(cpus_quota * 100_000)))
            return folder, str(folder / "cpu.cfs_quota_us")
        if (v2 / "cgroup.controllers").is_file():
            if "cpu" not in (v2 / "cgroup.subtree_control").read_text().split():
                (v2 / "cgroup.subtree_control").write_text("+cpu")
            folder = v2 / name
            folder.mkdir()
            (folder / "cpu.max").write_text(f"{int(cpus_quota * 100_000)} 100000")
            return folder, str(folder / "cpu.max")
    except OSError as err:
        pytest.skip(f"cannot create a cgroup with a CPU quota here ({err})")
    pytest.skip("no cgroup cpu controller mounted at /sys/fs/cgroup")


QUOTA_CODE = """
import json, os
from infra.cpus import budget, limit_native_threads
b = limit_native_threads()
import faiss, tempfile, torch
from curation.models.sscd import OnnxModel
from tests.curation import sscd_onnx
with tempfile.TemporaryDirectory() as tmp:
    ort = OnnxModel(sscd_onnx.save(os.path.join(tmp, "m.onnx"), "float_nchw"), threads=0)  # 0: one per CPU
print(json.dumps({"cpus": b.cpus, "quota": b.quota, "file": b.quota_file, "torch": torch.get_num_threads(),
                  "faiss": faiss.omp_get_max_threads(), "onnxruntime": ort.session.get_session_options().intra_op_num_threads,
                  "env": [os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")]}))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a quota below the affinity needs 2 CPUs")
def test_a_real_cgroup_quota_sizes_every_pool():
    """A process in a cgroup limited to 1 CPU on a machine of 2 or more (what `docker run --cpus 1` makes): the
    budget is 1 and torch, FAISS and the BLAS variables are sized to it, where by themselves they take every core
    of the affinity."""
    folder, binding = _cgroup_with_quota(1.0)
    try:
        got = _child(QUOTA_CODE, prefix=f"echo $$ > {folder}/cgroup.procs && ")
    finally:
        folder.rmdir()
    assert got == {"cpus": 1, "quota": 1.0, "file": binding, "torch": 1, "faiss": 1, "onnxruntime": 1,
                   "env": ["1", "1", "1"]}
    outside = _child(QUOTA_CODE)
    n = len(os.sched_getaffinity(0))
    assert (outside["cpus"], outside["quota"], outside["env"]) == (n, None, [None, None, None])
    assert outside["torch"] == outside["faiss"] == outside["onnxruntime"] == n


def test_ordered_map_keeps_the_order_bounds_what_is_in_flight_and_uses_its_threads():
    """What a shard's images go through in a stage of few shards (NSFW batches, face blurring): results in the
    items' order however long each takes, at most 2 x threads items taken from the iterable ahead of the results,
    work on `threads` threads; one thread is a plain map in the caller's thread."""
    import threading
    import time

    taken, names = [], set()

    def items():
        for i in range(40):
            taken.append(i)
            yield i

    def work(i):
        names.add(threading.current_thread().name)
        time.sleep(0.005 + 0.004 * (i % 5))  # later items often finish first
        return i * i

    out = []
    for r in ordered_map(work, items(), 3):
        out.append(r)
        assert len(taken) - len(out) <= 6  # taken ahead of what was handed on
    assert out == [i * i for i in range(40)] and len(names) == 3
    taken.clear()
    out.clear()
    for r in ordered_map(work, items(), 3, ahead=3):  # (NSFW: one batch per thread)
        out.append(r)
        assert len(taken) - len(out) <= 3
    assert out == [i * i for i in range(40)]
    names.clear()
    assert list(ordered_map(work, range(5), 1)) == [0, 1, 4, 9, 16]
    assert names == {threading.current_thread().name}
    assert threads_per_task(1, "auto") == cpus() and threads_per_task(10 * cpus(), "auto") == 1
    assert threads_per_task(10 * cpus(), 1) == cpus() and threads_per_task(3, 2) == max(1, cpus() // 2)
