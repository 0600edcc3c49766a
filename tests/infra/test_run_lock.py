"""One writer per run (infra.run_lock): a second `lvd run` / `lvd resume` of a run another process is writing is
refused before it writes anything, naming the holder; a holder that dies (SIGKILL) frees the run; `lvd status` tells
a running run from one whose process died without recording an end; Prefect's flow run of a dead attempt is marked
Crashed when the next attempt starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.pipeline import attempt_number
from infra import run_lock
from infra.history import attempts_from, describe
from infra.prefect_runs import unended_flow_runs
from infra.run_lock import Holder, RunBusy, holder, writing

REPO = Path(__file__).resolve().parents[2]
STOPPED = "without recording why (killed, out of memory, or its machine lost)"

# A process that takes the run's lock as `lvd run` does and prints its pid once it holds it; with "fork", it forks a
# child that keeps the inherited lock, prints the child's pid and exits; with "exec", it starts `sleep` and exits.
HOLDER = textwrap.dedent("""
    import os, subprocess, sys, time
    from infra.run_lock import writing
    with writing(sys.argv[1], "lvd run"):
        if sys.argv[2] == "fork":
            child = os.fork()
            if child == 0:
                time.sleep(120)
                os._exit(0)
            print(child, flush=True)
            os._exit(0)
        if sys.argv[2] == "exec":
            print(subprocess.Popen(["sleep", "120"]).pid, flush=True)
            os._exit(0)
        print(os.getpid(), flush=True)
        time.sleep(120)
""")


def _hold(path: Path, mode: str = "hold") -> tuple[subprocess.Popen, int]:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    return proc, int(proc.stdout.readline())


def _kill(pid: int) -> None:
    """SIGKILL, and wait until the process has exited (gone, or a zombie: its files are closed)."""
    os.kill(pid, signal.SIGKILL)
    status = Path(f"/proc/{pid}/status")
    for _ in range(200):
        try:
            if "\nState:\tZ" in status.read_text():
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)


def test_a_second_writer_is_refused_with_the_holder_and_a_killed_holder_frees_the_run(tmp_path):
    run = tmp_path / "runs" / "own-1234abcd"
    with pytest.raises(FileNotFoundError, match="no run at"), writing(run, "lvd run"):
        pytest.fail("a missing run was held")
    run.mkdir(parents=True)
    assert holder(run) is None and not (run / run_lock.LOCK_FILE).exists()  # a probe creates nothing
    proc, pid = _hold(run)
    try:
        live = holder(run)
        assert (live.pid, live.host, live.command, live.openers) == (pid, socket.gethostname(), "lvd run", ())
        t0 = time.monotonic()
        with pytest.raises(RunBusy) as err, writing(run, "lvd resume"):
            pytest.fail("the run was taken twice")
        assert time.monotonic() - t0 >= run_lock.ACQUIRE_WAIT_S  # (a reader's probe is waited out)
        assert str(err.value) == (
            f"run own-1234abcd is in use by another process (lvd run, pid {pid}, since {live.since[:19].replace('T', ' ')}"
            " UTC). Two processes writing one run would mix their shards and records, so this one stops before writing "
            f"anything. Follow it with `lvd status own-1234abcd --root {run.parent}`; to stop it: kill {pid} (it "
            f"records the stop and stops its children), then continue with `lvd resume own-1234abcd --root {run.parent}`")
    finally:
        _kill(pid)
        proc.wait()
    assert holder(run) is None  # the kernel released it with the process
    with writing(run, "lvd resume") as me:
        assert holder(run) == me  # (a second open file in the same process conflicts too)
        assert json.loads((run / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        with writing(run, "the lvd-pipeline flow") as again:  # the flow `lvd resume` starts: the same hold
            assert again is me
        assert holder(run) == me  # (the inner block released nothing)
    assert holder(run) is None


def test_a_forked_child_keeps_the_run_and_is_named_a_program_started_by_exec_does_not(tmp_path):
    """A child forked without exec (a worker pool) may still write the run: it keeps the lock after its parent exits,
    and the message names it; programs started with exec (the Prefect server, torchrun) never get the lock."""
    run = tmp_path / "r"
    proc, child = _hold(run, "fork")
    proc.wait()
    try:
        live = holder(run)
        assert (live.pid, live.openers) == (proc.pid, (child,))
        assert str(RunBusy(run, live)).endswith(
            f"`lvd status r --root {tmp_path}`; to stop it: kill {child} (pid {proc.pid} has exited; processes it "
            f"started still hold the run), then continue with `lvd resume r --root {tmp_path}`")
    finally:
        _kill(child)
    assert holder(run) is None
    proc, sleeper = _hold(run, "exec")
    proc.wait()
    try:
        assert holder(run) is None
    finally:
        _kill(sleeper)


def test_a_holder_on_another_machine_is_named_with_its_host():
    other = Holder(4242, "gpu-07", "lvd resume", "2026-12-07T15:00:00.000+00:00")
    assert other.describe() == "lvd resume, pid 4242 on gpu-07, since 2026-12-07 15:00:00 UTC"
    assert "to stop it, stop pid 4242 on gpu-07 (Ctrl-C or `kill`: it records the stop)" in str(RunBusy(Path("/x/r"), other))
    assert str(RunBusy(Path("/r/eval-1"), other, "evaluation")) == (
        "evaluation /r/eval-1 is being written by another process (lvd resume, pid 4242 on gpu-07, since 2026-12-07 "
        "15:00:00 UTC): wait for it to finish; to stop it, stop pid 4242 on gpu-07 (Ctrl-C or `kill`: it records the "
        "stop)")


def test_status_tells_a_running_attempt_from_one_that_died_without_a_record():
    events = [{"event": "launched"}, {"event": "flow_started"}, {"event": "started", "stage": "ingest"},
              {"event": "resumed"}, {"event": "launched"}, {"event": "flow_started"},
              {"event": "started", "stage": "ingest"}, {"event": "completed", "stage": "ingest"}]
    live = Holder(99, socket.gethostname(), "lvd resume", "2026-12-07T15:00:00.000+00:00")
    history = attempts_from(events)
    assert [r["ended"] for r in describe(history, live)] == [
        f"stopped in ingest {STOPPED}", "running between stages: lvd resume, pid 99, since 2026-12-07 15:00:00 UTC"]
    assert [r["ended"] for r in describe(history)][1] == f"stopped between stages {STOPPED}"
    assert [r["ended"] for r in describe(history, run_lock.UNKNOWN)][1] == (
        "running, or stopped between stages without recording why")
    assert describe(attempts_from(events[:1]), live)[0]["ended"] == (
        "running (starting): lvd resume, pid 99, since 2026-12-07 15:00:00 UTC")


def test_flow_runs_are_numbered_as_status_numbers_attempts_and_unended_ones_are_found():
    """`lvd run` logs `launched` before Prefect starts, and the flow run was named one attempt too far ("attempt 2"
    for a run's first)."""
    first = [{"event": "launched"}]
    assert attempt_number(first) == 1 and attempt_number([]) == 1  # (a flow started without the CLI: tests)
    events = [*first, {"event": "flow_started", "prefect_flow_run": "a"}, {"event": "started", "stage": "ingest"},
              {"event": "resumed"}, {"event": "launched"}, {"event": "flow_started", "prefect_flow_run": "b"},
              {"event": "failed", "stage": "ingest"}, {"event": "resumed"}, {"event": "launched"},
              {"event": "flow_started", "prefect_flow_run": "c"}, {"event": "flow_completed"},
              {"event": "resumed"}, {"event": "launched"}]
    assert attempt_number(events) == 4 == len(attempts_from(events))
    assert attempt_number(events[:-2]) == 4
    assert unended_flow_runs(events) == ["a"]


def test_the_cli_refuses_a_run_and_a_resume_in_use_with_status_75_and_writes_nothing(tmp_path, capsys):
    from flows.cli import main
    from infra.runs import prepare_run

    urls = tmp_path / "urls.csv"
    urls.write_text("url\nhttp://example.com/a.jpg\n")
    overrides = [f"data.url_list={urls}", f"run.root={tmp_path / 'runs'}", "embed.allow_random_init=true",
                 "embed.backbone.kind=vit", "embed.backbone.path=null"]
    config = REPO / "configs" / "own_folder.yaml"
    run, _ = prepare_run(config, overrides)
    files = sorted(p.name for p in run.path.iterdir())
    proc, pid = _hold(run.path)
    try:
        capsys.readouterr()
        assert main(["run", str(config), *overrides]) == run_lock.BUSY_EXIT
        assert main(["resume", run.run_id, "--root", str(run.root), "run.workers=1"]) == run_lock.BUSY_EXIT
        err = capsys.readouterr().err.splitlines()
        assert [line.split(" (")[0] for line in err] == [f"error: run {run.run_id} is in use by another process"] * 2
        assert all(f"kill {pid}" in line for line in err)
    finally:
        _kill(pid)
        proc.wait()
    assert sorted(p.name for p in run.path.iterdir()) == sorted([*files, run_lock.LOCK_FILE])
    assert not run.events_path.exists() and "workers: auto" in run.config_path.read_text()


def test_an_attempt_that_died_is_marked_crashed_in_prefect_by_the_next(tmp_path, prefect_server):
    """Prefect hears nothing from a SIGKILLed process: its flow run stayed Running for ever. The next attempt holds the
    run, so the earlier attempts' flow runs still Running are dead: marked Crashed; ended ones are left alone."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    from infra.prefect_runs import close_dead_attempts
    from infra.run import RunDir

    @flow(name="lvd-pipeline")
    def pipeline() -> None: ...

    with get_client(sync_client=True) as client:
        dead, done, failed = (client.create_flow_run(pipeline, name=n, state=Running()) for n in "abc")
        client.set_flow_run_state(done.id, Completed(), force=True)
        run = RunDir(tmp_path, "r")
        run.path.mkdir()
        for fr, end in ((dead, None), (done, "flow_completed"), (failed, "failed")):
            run.log_event("launched")
            run.log_event("flow_started", prefect_flow_run=str(fr.id))
            if end:
                run.log_event(end, "ingest" if end == "failed" else None)
        run.log_event("launched")
        run.log_event("flow_started", prefect_flow_run="00000000-0000-0000-0000-000000000000")  # (this attempt)
        close_dead_attempts(run, "00000000-0000-0000-0000-000000000000")
        states = [client.read_flow_run(fr.id).state for fr in (dead, done, failed)]
    assert [s.type.value for s in states] == ["CRASHED", "COMPLETED", "RUNNING"]
    assert states[0].message == ("its process stopped without recording an end (killed, out of memory, or its machine "
                                 "lost); found by r attempt 4")


def test_a_flow_started_without_the_cli_takes_the_run_too(tmp_path, prefect_server):
    """A Prefect deployment runs the `lvd-pipeline` flow without `lvd run`: the flow holds the run itself, so a second
    writer is refused there as well (and the flow `lvd run` starts takes the hold its CLI already has)."""
    from flows.pipeline import pipeline
    from infra.runs import prepare_run

    urls = tmp_path / "urls.csv"
    urls.write_text("url\nhttp://example.com/a.jpg\n")
    run, _ = prepare_run(REPO / "configs" / "own_folder.yaml", [
        f"data.url_list={urls}", f"run.root={tmp_path / 'runs'}", "embed.allow_random_init=true",
        "embed.backbone.kind=vit", "embed.backbone.path=null"])
    proc, pid = _hold(run.path)
    try:
        state = pipeline(str(run.root), run.run_id, return_state=True)
    finally:
        _kill(pid)
        proc.wait()
    assert state.is_failed() and f"run {run.run_id} is in use by another process (lvd run, pid {pid}" in state.message
    assert not run.events_path.exists()
