"""`lvd run` as a Prefect deployment: runs scheduled, or started from the Prefect UI or `prefect deployment run`.

    PREFECT_API_URL=http://HOST:4200/api lvd serve configs/own_folder.yaml data.url_list=photos.parquet \\
        "ingest.local_roots=[/data/photos]" --cron "0 3 * * *"

`lvd serve` checks the configuration as `lvd run` does, then serves the `lvd-run` flow (Prefect's `Flow.serve`: a
long-lived process that runs each of the deployment's runs in a subprocess) with the configuration file and the
overrides as the deployment's parameters, which a run started from the UI may change. Each run is what `lvd run` does
with them: the configuration and every input (the URL list, model files, image sets, a cluster) checked, every problem
the flow run's error before a run directory exists; then the run's `lvd-pipeline` flow, as a subflow. The same
configuration maps to the same run, so a scheduled run continues it and computes only what changed (a URL list
that grew: its new rows). Relative paths are taken from the directory `lvd serve` was typed in.

Each run is an attempt as `lvd run`'s is (`flows.attempt`): recorded as started by the deployment's flow run
(`lvd status`: `Prefect deployment lvd-run/own_folder (flow run 32662dd9)`), holding the run while it works, stopped
cleanly by a cancellation in Prefect (the UI's Cancel, `prefect flow-run cancel`: recorded as `cancelled in Prefect in
<stage>`, its children stopped, the pipeline's flow run Cancelled), and watched by a reaper (killed: the end recorded,
what it started stopped, its flow runs marked Crashed). The deployment takes `--concurrency` runs at a time (1): a run
started while one works (the schedule's next, Run clicked twice) waits in AwaitingConcurrencySlot. Not carried over:
the console summary (the flow run's logs and artifacts have it)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from infra.config import ConfigError


def _run_name() -> str:
    """The flow run's name in the UI: the configuration's name (its runs' ids start with it)."""
    return Path(flow_run.parameters["config"]).stem


@flow(name="lvd-run", flow_run_name=_run_name)
def lvd_run(config: str, overrides: list[str] | None = None, workdir: str | None = None) -> dict[str, Any]:
    """`lvd run CONFIG [overrides]` typed in `workdir` (relative paths are taken from there), as a flow: the run
    prepared and checked, then its pipeline."""
    from flows.attempt import started_by_prefect
    from flows.pipeline import pipeline
    from flows.preflight import check_run_inputs
    from infra.runs import prepare_run

    try:
        with contextlib.chdir(workdir or "."):  # (a served run's process has the server's directory)
            run, _ = prepare_run(Path(config), list(overrides or []), checks=check_run_inputs)
    except ConfigError as err:  # every problem, as the flow run's error
        raise ValueError(str(err)) from None
    with started_by_prefect(run, started_by(), str(flow_run.id)):
        return pipeline(str(run.root), run.run_id)


def started_by() -> str:
    """Who starts the attempt, as `lvd status` and the run's lock name it: `Prefect deployment lvd-run/own_folder
    (flow run 32662dd9)`, the start of the flow run's id (its page in the UI: /runs/flow-run/<id>; every flow run of a
    deployment has the configuration's name)."""
    from prefect.runtime import deployment

    name = f"Prefect deployment lvd-run/{deployment.name}" if deployment.name else "the lvd-run flow"
    return f"{name} (flow run {str(flow_run.id)[:8]})"


def serve(config: Path, overrides: list[str], name: str | None, cron: str | None, interval: float | None,
          concurrency: int = 1) -> None:
    """Check the configuration now (as `lvd run` does, writing nothing), then serve `lvd-run` until stopped. At most
    `concurrency` of its flow runs work at once; one started meanwhile (a schedule's next run while a long one works,
    Run clicked twice) waits in Prefect's AwaitingConcurrencySlot, where it would otherwise find the run in use and
    fail (`infra.run_lock`)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.settings import PREFECT_API_URL

    from flows.preflight import check_run_inputs
    from infra.runs import prepare_run

    if concurrency < 1:
        raise ConfigError([f"--concurrency {concurrency}: at least 1 run at a time"])
    if not PREFECT_API_URL.value():
        raise ConfigError(["PREFECT_API_URL: lvd serve needs a Prefect server that stays up (its scheduler creates the "
                           "runs; the UI starts them): `prefect server start`, then PREFECT_API_URL=http://HOST:4200/api "
                           "(docs/prefect.md)"])  # fmt: skip
    prepare_run(config, overrides, checks=lambda cfg, run: check_run_inputs(cfg, run, remember=False), write=False)
    parameters = {"config": str(Path(config).absolute()), "overrides": list(overrides), "workdir": str(Path.cwd())}
    limit = ConcurrencyLimitConfig(limit=concurrency, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    lvd_run.serve(name=name or Path(config).stem, parameters=parameters, cron=cron, interval=interval,
                  global_limit=limit, tags=["lvd", f"config:{Path(config).stem}"])  # fmt: skip
