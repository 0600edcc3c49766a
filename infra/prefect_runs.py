"""The Prefect flow runs of a run's attempts whose processes are gone without recording an end (SIGKILL, the
out-of-memory killer, a lost machine). Prefect hears nothing from a killed process, so it would show them Running for
ever: they are marked Crashed by the next attempt (which holds the run, `infra.run_lock`, so they are dead) and, where
the Prefect server outlives the process (`PREFECT_API_URL`: a server of your own, a deployment's), by the reaper that
found the process gone (`infra.reaper`)."""

from __future__ import annotations

import logging
from typing import Any

from infra.history import attempts_from
from infra.run import RunDir

log = logging.getLogger("lvd")

# Events after which an attempt's Prefect flow run has its final state (the flow returned, the interrupt handler marked
# it Cancelled, a stage failed and the flow with it).
_ENDS = {"flow_completed", "interrupted", "failed"}


def unended_flow_runs(events: list[dict[str, Any]]) -> list[str]:
    """The Prefect flow runs of the attempts whose record stops without an end (`_ENDS`), oldest first."""
    runs: dict[str, bool] = {}  # flow run id -> ended (dicts keep the order)
    for e in events:
        if e.get("event") == "flow_started" and e.get("prefect_flow_run"):
            runs[e["prefect_flow_run"]] = False
        elif e.get("event") in _ENDS and runs:
            runs[next(reversed(runs))] = True
    return [f for f, ended in runs.items() if not ended]


def close_dead_attempts(run: RunDir, current: str | None, message: str | None = None) -> None:
    """Mark Crashed in Prefect (with `message`) the flow runs of the run's attempts, other than `current`, that their
    record leaves unended and Prefect still shows Running or Pending."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    events = run.events()
    ids = [f for f in unended_flow_runs(events) if f != current]
    if not ids:
        return
    message = message or ("its process stopped without recording an end (killed, out of memory, or its machine lost); "
                          f"found by {run.run_id} attempt {len(attempts_from(events))}")
    with get_client(sync_client=True) as client:
        for flow_run_id in ids:
            try:
                flow_run = client.read_flow_run(flow_run_id)
                if flow_run.state is None or flow_run.state.type.value not in ("RUNNING", "PENDING"):
                    continue
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                log.info("Prefect flow run %s (%s) marked Crashed: its process is gone", flow_run.name, flow_run_id)
            except ObjectNotFound:  # recorded by another Prefect server (PREFECT_API_URL changed between attempts)
                continue
