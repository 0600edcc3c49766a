"""The process is stopping (Ctrl-C or SIGTERM, `flows/interrupt.py`): no stage starts meanwhile.

The stop runs in a thread of its own (it records the interruption, marks the Prefect flow run Cancelled, stops the
children, then exits the process: a few seconds), while the main thread goes on where it was. Before, a stage that
ended in those seconds was followed by the next one's `started` line and event, after `interrupted`, so the run's
history said the attempt stopped in a stage that had not really begun."""

from __future__ import annotations

import threading
import time

STOPPING = threading.Event()
HANDLED = threading.Event()  # a stop handler is in effect (`flows.interrupt.handled`): a signal stops the process
HOLD_S = 60.0  # the stop exits the process within seconds; past this, it failed: say so
NOTICE_S = 5.0  # how long a signal's exception waits for the handler's stop to begin
# How a signal's exception reads (Prefect raises TerminationSignal on SIGTERM in a flow run it started: a deployment's).
SIGNAL_ERRORS = ("TerminationSignal", "KeyboardInterrupt")


def hold_if_stopping() -> None:
    """Before anything starts: while the process is stopping, wait for its end (raise after `HOLD_S`)."""
    if STOPPING.is_set():
        time.sleep(HOLD_S)
        raise RuntimeError(f"the process was stopping (Ctrl-C or SIGTERM) and did not exit within {HOLD_S:g} s")


def hold_if_stopped_by(err: BaseException) -> None:
    """A stage's exception that is a signal's (Prefect's TerminationSignal, where Prefect's own SIGTERM handler is in
    effect) while a handler stops the process on that signal: the stage did not fail, the process stops. Wait for its
    exit, so that nothing records a failure; any other exception returns at once."""
    if HANDLED.is_set() and type(err).__name__ in SIGNAL_ERRORS and STOPPING.wait(NOTICE_S):
        hold_if_stopping()
