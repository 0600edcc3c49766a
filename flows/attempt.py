"""An attempt: one process working on a run, whoever started it (`lvd run` / `lvd resume` in a terminal, or a flow run
of the `lvd-run` deployment started by a schedule, the Prefect UI or its API: `flows.deploy`).

Either way the attempt is recorded as it starts (`launched`: who started it, the CPUs and memory it may use), one
process writes the run (`infra.run_lock`), SIGINT and SIGTERM stop it cleanly and are recorded (`flows.interrupt`; a
cancellation in Prefect is a SIGTERM from the runner or worker), and a reaper records its end and stops what it
started if it is killed (`infra.reaper`: the out-of-memory killer, SIGKILL after a cancellation's grace period).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from infra.run import RunDir


def launch(run: RunDir, by: str | None = None, prefect_flow_run: str | None = None) -> None:
    """Record the attempt's start (`launched`) with the CPUs and memory it may use (and log them); `by`: who started it
    where it is not the `lvd` command (`infra.history` reads `lvd run` / `lvd resume` from the events)."""
    from infra.cpus import budget
    from infra.memory import memory_budget

    cpus, memory = budget(), memory_budget()
    logging.getLogger("lvd").info("using %s and %s", cpus.describe(), memory.describe())  # (pools: infra.cpus)
    starter = {"by": by, "prefect_flow_run": prefect_flow_run}
    run.log_event("launched", cpus=cpus.cpus, cpu_budget=cpus.describe(), memory=memory.bytes,
                  memory_budget=memory.describe(), **{k: v for k, v in starter.items() if v})  # fmt: skip


@contextlib.contextmanager
def started_by_prefect(run: RunDir, by: str, flow_run_id: str) -> Iterator[None]:
    """The attempt a Prefect flow run (`flow_run_id`, of a deployment) makes on `run`, recorded as started `by` it,
    for the duration of the block: what `lvd run` does around its flow, with a cancellation of that flow run in Prefect
    recorded as one."""
    from prefect.settings import PREFECT_API_URL

    from flows import interrupt
    from infra import reaper, run_lock

    resume = interrupt.resume_command(run.root, run.run_id)
    with run_lock.writing(run.path, by), interrupt.for_run(run.root, run.run_id, cancellable=flow_run_id), \
            reaper.watching(run.path, by, resume, prefect_api=PREFECT_API_URL.value()):  # fmt: skip
        launch(run, by, flow_run_id)
        yield
