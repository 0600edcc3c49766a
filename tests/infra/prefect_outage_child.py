"""Child process of test_prefect_outage.py: Prefect's event client connects to a real API server, the server stops,
more events are queued, the flow's work "ends" (a `flow_completed` event in the run's events.jsonl), and the process
flushes Prefect's services as `lvd` does, under `flows.cli.running.ExitWatchdog` ("bounded") or without it ("plain").

    python tests/infra/prefect_outage_child.py (bounded|plain) N_EVENTS RUN_ROOT
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli.running import ExitWatchdog, _exit_timeout, _flush_prefect
from infra.run import RunDir


def main(mode: str, n_events: int, root: Path) -> int:
    run = RunDir(root, "outage")
    run.log_event("flow_started")
    server = SubprocessASGIServer()
    server.start(timeout=180)
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        if mode == "bounded":
            ExitWatchdog(run.events_path, _exit_timeout(), "lvd resume outage").start()
        emit_event("lvd.test.connected", resource={"prefect.resource.id": "lvd.test"})
        EventsWorker.instance().wait_until_empty()  # delivered: the client is connected
        server.stop()
        print("server stopped", flush=True)
        for i in range(n_events):
            emit_event(f"lvd.test.undelivered.{i}", resource={"prefect.resource.id": "lvd.test"})
        run.log_event("flow_completed")
        _flush_prefect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
