"""A small process that outlives a run's process only to clean up after it, however it ended.

When the kernel's out-of-memory killer (or `kill -9`, or a crash in native code) ends `lvd run`, nothing in that
process runs again: the Prefect server it started (an ephemeral API server, ~240 MB, a port and its database) was left
running for ever, re-parented to init, one more after every such end; the run's record just stopped, so `lvd status`
could only guess "killed, out of memory, or its machine lost"; and the terminal showed the shell's `Killed`.

The reaper is started by the commands that work on a run (`lvd run`, `lvd resume`, `lvd retry-failed`, `lvd
evaluate`), in a session of its own (a terminal's Ctrl-C does not reach it). It notes the processes below the run's
process every second, and the kernel's out-of-memory kill counter of its cgroup (`infra.memory.oom_kills`) at its
start. When the run's process is gone without having dismissed it, and the run's record has no end (no completion,
failure or interruption), it records one, `process_lost` in events.jsonl, with whether an out-of-memory kill was
counted since it started; it stops what is left of that tree (SIGTERM, then SIGKILL after a grace period) and says
so on the terminal with the command that continues the run (`MEMORY_KEYS`: with less memory where a setting pays).
Then it exits. A process started and killed between two of its looks (under a second) is not seen; the run's lock
(`infra.run_lock`) is taken for the record, so a resume already under way is left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infra.memory import MemoryBudget

POLL_S = 1.0
GRACE_S = 5.0  # from SIGTERM to SIGKILL for what is left
READY = b"ready\n"  # what the reaper prints once it has taken its first look
DISMISS = b"done\n"  # what the watched process writes to the reaper's standard input when it leaves the watched block
_started: set[int] = set()  # reapers this process started (a Ctrl-C handler stopping its children leaves them alone)

# The settings that lower a stage's memory, measured or by construction, for the message after an out-of-memory kill,
# and whether `lvd resume` takes them. Training: execution keys (its checkpoints are kept). NSFW: a smaller batch (its
# inputs and onnxruntime's activations are per batch: peak 1,549 -> 1,224 MiB at 16 instead of 64 on 2 CPUs; a
# resume may not change it, so the message starts a run from the killed one's configuration, which reuses its
# finished stages). The other curation stages have none that pays on 2 CPUs: one shard in flight or one CPU instead
# of two changed their peaks by less than 50 MB (docs/guarantees.md, "Killed, or out of memory").
MEMORY_KEYS = {
    "nsfw": ("nsfw.batch_size=16", False),
    **{stage: ("train.activation_checkpointing=true or train.num_workers=0", True)
       for stage in ("pretrain", "pretrain_highres", "distill")},
}


@contextlib.contextmanager
def watching(run_dir: Path | None, command: str, resume: str | None = None, prefect_api: str | None = None
             ) -> Iterator[int | None]:  # fmt: skip
    """While the block runs, a reaper watches this process (its pid, or None where it could not start: the work goes
    on without it). Leaving the block dismisses it: a process that returns, or exits by an exception, cleans up after
    itself (Prefect stops its server at exit; a Ctrl-C stops the children: `flows.interrupt`). `prefect_api`: a
    Prefect server that outlives the process (not the embedded one), where the reaper marks the run's unended flow
    runs Crashed."""
    proc = _start(run_dir, command, resume, prefect_api)
    if proc is not None and not _ready(proc):
        proc = None
    try:
        yield proc.pid if proc is not None else None
    finally:
        if proc is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.write(DISMISS)
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            _started.discard(proc.pid)


def _start(run_dir: Path | None, command: str, resume: str | None, prefect_api: str | None) -> subprocess.Popen | None:
    args = [sys.executable, "-m", "infra.reaper", "--pid", str(os.getpid()), "--command", command]
    args += ["--run", str(run_dir)] if run_dir is not None else []
    args += ["--resume", resume] if resume else []
    args += ["--prefect-api", prefect_api] if prefect_api else []
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                                env=env, close_fds=True)  # fmt: skip
    except OSError:
        return None
    _started.add(proc.pid)
    return proc


def _ready(proc: subprocess.Popen, timeout: float = 30.0) -> bool:
    """Wait until the reaper has taken its first look (it prints READY), so that what this process started before
    is known to it even if this process is killed at once."""
    ready = select.select([proc.stdout], [], [], timeout)[0]
    line = proc.stdout.readline() if ready else b""
    proc.stdout.close()
    if line == READY:
        return True
    with contextlib.suppress(OSError):
        proc.kill()
    _started.discard(proc.pid)
    return False


def started() -> set[int]:
    """The reapers this process started and has not dismissed."""
    return set(_started)


def watch(pid: int, poll: float = POLL_S) -> list | None:
    """Wait for process `pid` to end; the processes that were below it at the last look and are still alive, or
    None where it dismissed this reaper first (its standard input: `DISMISS`)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.Error:
        return []
    seen: dict[int, psutil.Process] = {}
    me, stdin, closed, first = os.getpid(), sys.stdin.fileno(), False, True
    while True:
        try:
            for child in parent.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)
        except psutil.Error:
            pass
        if first:
            with contextlib.suppress(OSError):
                os.write(sys.stdout.fileno(), READY)
                os.close(sys.stdout.fileno())
            first = False
        ready = [] if closed else select.select([stdin], [], [], poll)[0]
        if ready:
            data = os.read(stdin, 64)
            if DISMISS in data:
                return None
            closed = not data  # end of file: the process is ending (or a child it forked holds the pipe open)
        if closed:
            psutil.wait_procs([parent], timeout=poll)
        if not alive(parent):
            return [proc for proc in seen.values() if alive(proc)]


def alive(proc: object) -> bool:
    """Running and not a zombie (a child killed as its parent exits stays a zombie until init reaps it, which a
    container's init may never do; it holds no resources but its process-table entry)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # type: ignore[attr-defined]
    except psutil.Error:
        return False


def stop(procs: list, grace: float = GRACE_S) -> None:
    """SIGTERM `procs`, then SIGKILL those still alive after `grace` seconds (0: SIGKILL at once). psutil checks each
    process's start time before it signals, so a pid reused since is left alone."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill() if grace <= 0 else p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace or 0.5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def close_in_prefect(run_dir: Path, api: str, message: str, timeout: float = 20.0) -> None:
    """Mark Crashed at the Prefect server `api` the run's flow runs that its record leaves unended (the lost process's:
    Prefect would show them Running), within `timeout` seconds (the server may be unreachable: a warning)."""
    import threading

    errors: list[BaseException] = []

    def close() -> None:
        try:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from infra.prefect_runs import close_dead_attempts
            from infra.run import RunDir

            with temporary_settings(updates={PREFECT_API_URL: api}):
                close_dead_attempts(RunDir(run_dir.parent, run_dir.name), None, message)
        except Exception as err:
            errors.append(err)

    t = threading.Thread(target=close, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive() or errors:
        why = f"{type(errors[0]).__name__}: {errors[0]}" if errors else f"no answer within {timeout:g} s"
        print(f"lvd: could not mark the run's flow runs Crashed at the Prefect API {api} ({why}); the next attempt "
              "does", file=sys.stderr)


def _names(procs: list) -> str:
    """`Prefect's API server (pid 123), python (pid 456)`."""
    import psutil

    out = []
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
            name = "Prefect's API server" if "prefect.server.api.server" in cmd else p.name()
        except psutil.Error:  # (gone meanwhile, or not readable)
            name = "a process"
        out.append(f"{name} (pid {p.pid})")
    return ", ".join(out)


def record_loss(run_dir: Path, pid: int, command: str, oom: tuple[int, str] | None, memory: MemoryBudget) -> str | None:
    """`process_lost` in the run's events, where its record has no end; the stage it stopped in (or "") then, None
    where the record ended (completed, failed, interrupted) or another process holds the run."""
    from infra.history import attempts_from
    from infra.run import RunDir
    from infra.run_lock import RunBusy, writing

    run = RunDir(run_dir.parent, run_dir.name)
    try:
        with writing(run.path, "lvd reaper", "run"):
            history = attempts_from(run.events())
            if not history or history[-1].completed or history[-1].error or history[-1].interrupted:
                return None
            a = history[-1]
            if a.stopped_in is not None and a.stages[a.stopped_in].outcome == "failed":
                return None
            fields = {"pid": pid, "command": command, "memory": memory.bytes, "memory_budget": memory.describe()}
            if oom is not None:
                fields |= {"oom_kills": oom[0], "oom_counter": oom[1]}
            run.log_event("process_lost", **fields)
            return a.stopped_in or ""
    except RunBusy:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.reaper", description=__doc__.splitlines()[0])
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--command", default="lvd")
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--prefect-api", default=None)
    args = p.parse_args(argv)
    from infra.memory import memory_budget, oom_kills, oom_kills_since

    before = oom_kills()
    left = watch(args.pid)
    if left is None:  # dismissed: the process ended its work and cleans up after itself
        return 0
    names = _names(left)  # (before they are stopped)
    oom, memory, stage = oom_kills_since(before), memory_budget(), None
    if args.run is not None and (args.run / "events.jsonl").is_file():
        # Recorded first: whoever waits for this process's tree to be gone (a script, a scheduler's retry) finds
        # the end in the record when it resumes.
        stage = record_loss(args.run, args.pid, args.command, oom, memory)
    if left:
        stop(left)
    if stage is None:
        return 0
    where = f"in {stage}" if stage else "before its first stage"
    if args.prefect_api:
        close_in_prefect(args.run, args.prefect_api, f"its process ({args.command}, pid {args.pid}) stopped {where} "
                         f"without recording why; its reaper recorded the end ({args.resume} continues it)")
    if oom is not None:
        lines = [f"lvd: {args.command} (pid {args.pid}) was killed by the kernel's out-of-memory killer {where}; it "
                 f"could use {memory.describe()}."]
    else:
        lines = [f"lvd: {args.command} (pid {args.pid}) stopped {where} without recording why: killed by a signal, or "
                 f"crashed (no out-of-memory kill was counted); it could use {memory.describe()}."]
    if left:
        lines.append(f"lvd: stopped what it had started: {names}.")
    if oom is not None and stage in MEMORY_KEYS and args.resume:
        setting, resumable = MEMORY_KEYS[stage]
        if resumable:
            lines.append(f"lvd: {stage} needs less memory with {setting} (its checkpoints are kept): {args.resume} "
                         f"{setting.split()[0]}")
        else:
            lines.append(f"lvd: {stage} needs less memory with {setting}, which a resume may not change: a run from "
                         f"this one's configuration reuses its finished stages: lvd run {args.run / 'config.yaml'} "
                         f"{setting} run.run_id={args.run.name}-lowmem")
    elif oom is not None and args.resume:
        lines.append(f"lvd: finished shards are kept; continue with: {args.resume} (a new process holds none of the "
                     f"memory the stages before {stage or 'it'} left behind), or give the run more memory")
    elif args.resume:
        lines.append(f"lvd: finished shards and training checkpoints are kept; continue with: {args.resume}")
    with contextlib.suppress(OSError):
        print("\n".join(lines), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
