"""Ctrl-C (SIGINT) and SIGTERM stop a run the same way, within seconds: recorded, children stopped, nothing half-written.

Left to Python, SIGINT becomes a KeyboardInterrupt in whatever frame the main thread is in, and Prefect (during a
flow run) and Lightning (during fit) replace the SIGTERM handler with their own: the signal was caught by a thread
pool's wait, Prefect's engine or Lightning's loop, each its own way (the flow ran on to its end; or it hung a minute
while worker threads finished their shards; or the process ignored it). So the signals are not handled in a Python
handler at all: `signal.set_wakeup_fd` makes the interpreter's C-level handler write each signal's number to a pipe as
it arrives, whichever Python handler is installed, and a watcher thread reading that pipe stops the process: the
run's events.jsonl records `interrupted` (with the signal), the Prefect flow run is marked Cancelled where its API still
answers (a few seconds at most), the process's children (training processes, Dask/Ray workers, the embedded Prefect
server) are stopped, and the process exits with 128 + the signal number, as a shell reports it.

A run started by a Prefect deployment (`flows.deploy`) is stopped the same way. A cancellation in Prefect (the UI's
Cancel, `prefect flow-run cancel`) reaches it as SIGTERM from the runner or worker that started it; the flow run it
cancelled is then in state Cancelling, which tells it from any other SIGTERM, so the run records a cancellation.

Nothing is lost by stopping between any two instructions: every file a stage writes is written to a temporary name and
renamed, shards are marked done last and training checkpoints are atomic (infra.storage), so `lvd resume` continues
from the last finished shard or checkpoint. A second signal while the first is handled stops at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from infra.run import RunDir
from infra.stopping import HANDLED, STOPPING

SIGNALS = (signal.SIGINT, signal.SIGTERM)
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
CHILD_GRACE_S = 2.0  # children get this long to stop after SIGTERM before they are killed (nothing to save)
PREFECT_GRACE_S = 3.0  # the Prefect API gets this long to record the flow run as cancelled


def descendants() -> list:
    """Every process below this one (psutil.Process objects) but its reaper (`infra.reaper`: it stops what outlives
    this process), taken before any is stopped: a grandchild whose parent exits first is re-parented away from this
    process and no longer listed as its descendant."""
    import psutil

    from infra.reaper import started

    try:
        return [p for p in psutil.Process().children(recursive=True) if p.pid not in started()]
    except psutil.Error:
        return []


def stop_children(procs: list, grace: float = CHILD_GRACE_S) -> None:
    """SIGTERM `procs` (and any descendant started since), then SIGKILL those still alive after `grace` seconds (0:
    SIGKILL at once)."""
    from infra.reaper import stop

    stop(list({p.pid: p for p in [*procs, *descendants()]}.values()), grace)


def _bounded(call: Callable[[], object]) -> object | None:
    """`call()` against the Prefect API, or None after `PREFECT_GRACE_S` or on any error (the server may be gone: the
    embedded one is a child, and Ctrl-C in a terminal reaches it too)."""
    out: list[object] = []

    def run() -> None:
        with contextlib.suppress(Exception):
            out.append(call())

    t = threading.Thread(target=run, name="lvd-prefect-call", daemon=True)
    t.start()
    t.join(PREFECT_GRACE_S)
    return out[0] if out else None


def _cancel_flow_runs(flow_run_ids: list[object | None], message: str) -> None:
    """Mark the Prefect flow runs Cancelled, bounded in time. The run's own record is its events.jsonl."""
    ids = [f for f in flow_run_ids if f is not None]
    if not ids:
        return

    def cancel() -> None:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        with get_client(sync_client=True) as client:
            for flow_run_id in ids:
                client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)

    _bounded(cancel)


def cancelled_in_prefect(flow_run_id: object | None) -> bool:
    """Whether the Prefect flow run was cancelled in Prefect (the UI, its API): state Cancelling (the runner or
    worker then sends SIGTERM) or Cancelled."""
    if flow_run_id is None:
        return False

    def state() -> str | None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run_id)
        return flow_run.state.type.value if flow_run.state is not None else None

    return _bounded(state) in ("CANCELLING", "CANCELLED")


class Interrupts:
    """Stops the process on SIGINT / SIGTERM; `run` (None before the run directory exists) records the interruption,
    `resume` is the command that continues it; `cancellable`: the Prefect flow run (a deployment's) whose
    cancellation in Prefect is a SIGTERM to this process."""

    def __init__(self, run: RunDir | None, resume: str | None, cancellable: str | None = None):
        self.run, self.resume, self.cancellable = run, resume, cancellable
        self.since = len(run.events()) if run is not None else 0  # events logged before this process's flow
        self.count = 0
        self.family: list = []  # the process tree when the first signal arrived
        self._lock = threading.Lock()

    def stop(self, signum: int) -> None:
        STOPPING.set()  # no stage starts from now on (infra.stopping)
        with self._lock:
            self.count += 1
            first = self.count == 1
            if first:
                self.family = descendants()
        code = 128 + signum
        if not first:  # a second signal while the first is handled: stop now
            stop_children(self.family, grace=0)
            os._exit(code)
        cancelled = signum == signal.SIGTERM and cancelled_in_prefect(self.cancellable)
        how = "cancelled in Prefect" if cancelled else f"interrupted by {NAMES.get(signum, signal.Signals(signum).name)}"
        flow_run = self._flow_run()  # (before `interrupted` is logged)
        if self.run is not None and self.run.path.is_dir():
            self.run.log_event("interrupted", signal=signal.Signals(signum).name,
                               **({"cancelled_in": "prefect"} if cancelled else {}))  # fmt: skip
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
        print(f"\nlvd: {how}: stopping ({again} stops at once).", file=sys.stderr, flush=True)
        # The deployment's flow run too, unless Prefect cancelled it (its runner marks it once the process is gone):
        # Ctrl-C in the terminal of `lvd serve` stops the runner with this process, and nothing else would.
        outer = None if cancelled else self.cancellable
        _cancel_flow_runs([flow_run, outer], how + (f"; `{self.resume}` continues it" if self.resume else ""))
        stop_children(self.family)
        if self.resume:
            print(f"lvd: finished shards and training checkpoints are kept; continue with: {self.resume}",
                  file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not SystemExit: no handler of Prefect's or Lightning's may go on working on the way out

    def _flow_run(self) -> str | None:
        """The Prefect flow run this process started for the run (its `flow_started` event names it), or None: an
        earlier attempt's flow run is not this process's to cancel."""
        if self.run is None or not self.run.path.is_dir():
            return None
        started = [e for e in self.run.events()[self.since :] if e.get("event") == "flow_started"]
        return started[-1].get("prefect_flow_run") if started else None


def _watch(read_fd: int, handler: Interrupts) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:  # closed: the context ended
            return
        if not data:
            return
        for signum in data:
            if signum in SIGNALS:  # the first stops in its own thread, so that a second is still read: stop now
                threading.Thread(target=handler.stop, args=(signum,), name="lvd-stop", daemon=True).start()


def _ignore(_signum: int, _frame: object) -> None:
    """The Python-level handler: nothing (the watcher acts); its presence keeps the C-level handler installed, and
    SIGINT no longer raises KeyboardInterrupt wherever the main thread happens to be."""


_active: list[Interrupts] = []  # the handlers in effect, innermost last


def attach(run: RunDir, resume: str) -> None:
    """From now on the handler in effect records an interruption in ``run`` and names ``resume``: the run directory
    exists, while the flow that installs its own handler is still being set up (imports, Prefect's start)."""
    if _active:
        _active[-1].run, _active[-1].resume, _active[-1].since = run, resume, len(run.events())


@contextlib.contextmanager
def handled(run: RunDir | None = None, resume: str | None = None, cancellable: str | None = None
            ) -> Iterator[Interrupts]:  # fmt: skip
    """Stop on SIGINT / SIGTERM for the duration (main thread only: elsewhere, e.g. a test's worker thread, a no-op)."""
    handler = Interrupts(run, resume, cancellable)
    if threading.current_thread() is not threading.main_thread():
        yield handler
        return
    _active.append(handler)
    HANDLED.set()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {s: signal.signal(s, _ignore) for s in SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read_fd, handler), name="lvd-interrupts", daemon=True)
    watcher.start()
    try:
        yield handler
    finally:
        _active.remove(handler)
        if not _active:
            HANDLED.clear()
        signal.set_wakeup_fd(previous_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(write_fd)
        os.close(read_fd)  # the watcher's read fails: it returns


def for_run(root: Path, run_id: str, cancellable: str | None = None) -> contextlib.AbstractContextManager[Interrupts]:
    return handled(RunDir(Path(root), run_id), resume_command(root, run_id), cancellable)


def resume_command(root: Path | str, run_id: str) -> str:
    return f"lvd resume {run_id} --root {root}"
