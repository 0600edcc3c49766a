"""The reaper (infra.reaper): when a run's process is killed (SIGKILL, the kernel's out-of-memory killer), what it
started is stopped and the run's record gets its end, with whether the out-of-memory killer did it; a process that
leaves its watched block dismisses its reaper. The out-of-memory kill is a real one, in a real cgroup with a memory
limit, where this machine lets the test create one (as root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from infra import reaper
from infra.cgroup import folders
from infra.history import attempts_from, describe
from infra.memory import MemoryBudget, machine_memory, memory_budget

REPO = Path(__file__).resolve().parents[2]

# A run's process as `lvd run` is while it works: it holds the run, has recorded its start and a stage, has started
# a child program (as Prefect starts its server) and is watched by its reaper; it prints the reaper's and the child's
# pids, then sleeps ("sleep"), or allocates memory until the out-of-memory killer ends it ("oom"), or leaves the
# watched block and exits ("leave").
RUN = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from infra import reaper
    from infra.run import RunDir
    from infra.run_lock import writing
    root, mode = Path(sys.argv[1]), sys.argv[2]
    run = RunDir(root, "r1")
    with writing(run.path, "lvd run", create=True):
        run.log_event("launched", cpus=1)
        run.log_event("started", sys.argv[3])
        child = subprocess.Popen(["sleep", "600"])
        with reaper.watching(run.path, "lvd run", f"lvd resume r1 --root {root}") as pid:
            print(pid, child.pid, flush=True)
            if mode == "oom":
                hog = []
                while True:
                    hog.append(b"x" * 2**24)  # 16 MiB, written: resident
            if mode == "sleep":
                time.sleep(600)
        print("left", flush=True)
        child.kill()
""")


def _start(root: Path, mode: str, prefix: str = "", stage: str = "ingest") -> tuple[subprocess.Popen, int, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(["bash", "-c", f'{prefix}exec "{sys.executable}" -c "$0" "$1" "$2" "$3"', RUN, str(root),
                             mode, stage], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env)  # fmt: skip
    reaper_pid, child_pid = map(int, proc.stdout.readline().split())
    return proc, reaper_pid, child_pid


def _gone(pid: int, timeout: float = 30.0) -> bool:
    """Whether process `pid` has ended within `timeout` seconds (a zombie waiting for init counts as ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _events(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "r1" / "events.jsonl").read_text().splitlines()]


def test_a_killed_process_leaves_nothing_running_and_its_end_is_recorded(tmp_path):
    """SIGKILL to the run's process alone (`kill -9 PID`): its reaper stops the program it had started, records
    `process_lost` (no out-of-memory kill counted), says so where the process's errors went, and exits."""
    proc, reaper_pid, child_pid = _start(tmp_path, "sleep")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone(reaper_pid) and _gone(child_pid)
    memory = memory_budget().describe()
    assert proc.stderr.read().splitlines() == [
        f"lvd: lvd run (pid {proc.pid}) stopped in ingest without recording why: killed by a signal, or crashed (no "
        f"out-of-memory kill was counted); it could use {memory}.",
        f"lvd: stopped what it had started: sleep (pid {child_pid}).",
        f"lvd: finished shards and training checkpoints are kept; continue with: lvd resume r1 --root {tmp_path}"]
    lost = _events(tmp_path)[-1]
    assert {k: lost[k] for k in ("event", "pid", "command", "memory_budget")} == {
        "event": "process_lost", "pid": proc.pid, "command": "lvd run", "memory_budget": memory}
    assert "oom_kills" not in lost
    assert describe(attempts_from(_events(tmp_path)))[0]["ended"] == (
        "killed or crashed in ingest (no out-of-memory kill was counted; its reaper recorded the end)")


def test_a_process_that_leaves_the_watched_block_dismisses_its_reaper(tmp_path):
    """The normal way out: the reaper exits at once, records nothing and stops nothing (the process ends its own
    children, as Prefect stops its server at exit)."""
    proc, reaper_pid, _ = _start(tmp_path, "leave")
    assert proc.stdout.readline() == "left\n"
    assert _gone(reaper_pid, timeout=5)
    assert proc.wait(timeout=30) == 0 and proc.stderr.read() == ""
    assert [e["event"] for e in _events(tmp_path)] == ["launched", "started"]
    assert reaper.started() == set()  # (this process started none)


def _memory_cgroup(limit: int) -> Path:
    """A real cgroup below this process's memory cgroup with a memory limit (v1 `memory.limit_in_bytes`, v2
    `memory.max`); skips where this machine does not let the test create one."""
    own = next(((fstype, folder) for fstype, folder in folders("memory")), None)
    if own is None:
        pytest.skip("no cgroup memory controller mounted")
    fstype, parent = own
    folder = parent / f"lvd-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
        (folder / ("memory.max" if fstype == "cgroup2" else "memory.limit_in_bytes")).write_text(str(limit))
        if fstype == "cgroup" and (folder / "memory.memsw.limit_in_bytes").is_file():
            (folder / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no way around it through swap
    except OSError as err:
        if folder.is_dir():
            folder.rmdir()
        pytest.skip(f"cannot create a cgroup with a memory limit here ({err})")
    return folder


ADVICE = {
    "pretrain": "lvd: pretrain needs less memory with train.activation_checkpointing=true or train.num_workers=0 (its "
                "checkpoints are kept): lvd resume r1 --root {root} train.activation_checkpointing=true",
    "nsfw": "lvd: nsfw needs less memory with nsfw.batch_size=16, which a resume may not change: a run from this one's "
            "configuration reuses its finished stages: lvd run {root}/r1/config.yaml nsfw.batch_size=16 "
            "run.run_id=r1-lowmem",
    "faces": "lvd: finished shards are kept; continue with: lvd resume r1 --root {root} (a new process holds none of "
             "the memory the stages before faces left behind), or give the run more memory"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups and the out-of-memory killer are Linux's")
@pytest.mark.parametrize("stage", ["pretrain", "nsfw", "faces"])
def test_an_out_of_memory_kill_is_named_with_the_limit_and_the_setting_that_lowers_the_stages_memory(tmp_path, stage):
    """The run's process in a cgroup limited to 384 MiB allocates until the kernel's out-of-memory killer ends it:
    its reaper counts the kill in that cgroup, records it, stops the child and says how to continue: a resume with the
    setting that lowers the stage's memory (pretraining), a run from the killed one's configuration with a setting a
    resume may not change (NSFW's batch), or a resume, which starts without what the earlier stages left in memory."""
    limit = 384 * 2**20
    folder = _memory_cgroup(limit)
    try:
        proc, reaper_pid, child_pid = _start(tmp_path, "oom", prefix=f"echo $$ > {folder}/cgroup.procs && ",
                                             stage=stage)
        assert proc.wait(timeout=120) == -signal.SIGKILL
        assert _gone(reaper_pid) and _gone(child_pid)
        v2 = (folder / "memory.max").is_file()
        counter = folder / ("memory.events.local" if (folder / "memory.events.local").is_file() else
                            "memory.events" if v2 else "memory.oom_control")  # fmt: skip
        limit_file = folder / ("memory.max" if v2 else "memory.limit_in_bytes")
        memory = MemoryBudget(limit, machine_memory(), limit, str(limit_file)).describe()
        assert proc.stderr.read().splitlines() == [
            f"lvd: lvd run (pid {proc.pid}) was killed by the kernel's out-of-memory killer in {stage}; it could use "
            f"{memory}.",
            f"lvd: stopped what it had started: sleep (pid {child_pid}).", ADVICE[stage].format(root=tmp_path)]
        lost = _events(tmp_path)[-1]
        assert {k: lost[k] for k in ("event", "pid", "oom_kills", "oom_counter", "memory")} == {
            "event": "process_lost", "pid": proc.pid, "oom_kills": 1, "oom_counter": str(counter), "memory": limit}
        assert describe(attempts_from(_events(tmp_path)))[0]["ended"] == (
            f"killed by the kernel's out-of-memory killer in {stage} (it could use 0.4 GiB)")
    finally:
        deadline = time.monotonic() + 30
        while (folder / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        folder.rmdir()


# A stage whose worker process is ended by the out-of-memory killer: the stage fails with the worker's own error,
# which says nothing of memory ("worker died", as Dask or a data loader says it).
STAGE = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    from infra.config import load_config
    from infra.run import RunDir
    from infra.stage import StageSpec, run_stage

    def fn(ctx):
        code = "hog = []\\nwhile True:\\n    hog.append(b'x' * 2**24)"
        rc = subprocess.run([sys.executable, "-c", code]).returncode
        raise RuntimeError(f"worker died (exit status {rc})")

    try:
        run_stage(StageSpec("ingest", ("ingest",), (), fn), RunDir(Path(sys.argv[1]), "r1"), load_config(None))
    except RuntimeError:
        pass
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups and the out-of-memory killer are Linux's")
def test_a_stage_whose_worker_was_killed_for_memory_says_so_in_its_error(tmp_path):
    limit = 384 * 2**20
    folder = _memory_cgroup(limit)
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        script = tmp_path / "stage.py"  # (a file: a stage's code version is read from its function's source)
        script.write_text(STAGE)
        subprocess.run(["bash", "-c", f'echo $$ > {folder}/cgroup.procs && exec "{sys.executable}" "$0" "$1"',
                        str(script), str(tmp_path)], cwd=REPO, env=env, check=True, timeout=300)  # fmt: skip
    finally:
        folder.rmdir()
    v2 = (folder / "memory.max").is_file()
    counter = folder / ("memory.events.local" if v2 else "memory.oom_control")
    memory = MemoryBudget(limit, machine_memory(), limit, str(folder / ("memory.max" if v2 else "memory.limit_in_bytes")))
    failed = [e for e in _events(tmp_path) if e["event"] == "failed"]
    assert [e["error"] for e in failed] == [
        f"RuntimeError: worker died (exit status -9) (meanwhile the kernel's out-of-memory killer ended 1 process of "
        f"this run's cgroup, counted in {counter}; the run could use {memory.describe()})"]
