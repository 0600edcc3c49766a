"""The process is stopping (Ctrl-C or SIGTERM, `flows/cli/interrupt.py`): no stage starts meanwhile.

The stop runs in a thread of its own (it records the interruption, marks the Prefect flow run Cancelled, stops the
children, then exits the process: a few seconds), while the main thread goes on where it was. Before, a stage that
ended in those seconds was followed by the next one's `started` line and event, after `interrupted`, so the run's
history said the attempt stopped in a stage that had not really begun."""

from __future__ import annotations

import threading
import time

STOPPING = threading.Event()
HOLD_S = 60.0  # the stop exits the process within seconds; past this, it failed: say so


def hold_if_stopping() -> None:
    """Before anything starts: while the process is stopping, wait for its end (raise after `HOLD_S`)."""
    if STOPPING.is_set():
        time.sleep(HOLD_S)
        raise RuntimeError(f"the process was stopping (Ctrl-C or SIGTERM) and did not exit within {HOLD_S:g} s")
