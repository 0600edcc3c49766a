"""`lvd serve` / the `lvd-run` flow (flows/deploy.py): a deployment's run is `lvd run` typed in the directory `lvd serve`
was typed in; a configuration with problems fails the flow run with every problem, before a run directory exists;
serving needs a Prefect server that stays up. (Served and triggered by hand with `prefect server start`,
`lvd serve` and `prefect deployment run`: docs/prefect.md.)"""

from __future__ import annotations

from pathlib import Path

from flows.cli import main as cli
from flows.deploy import lvd_run
from infra.manifest import read_manifest
from infra.run import RunDir

REPO = Path(__file__).resolve().parents[2]
# The tiny crawl at a fifth of its size; its ingest still lasts seconds (img2dataset's start, the planted slow server).
SMALL = ["demo.pool_mnist=40", "demo.pool_sklearn_digits=10", "demo.near_duplicates=4", "demo.eval_copies=2",
         "demo.faces=2", "demo.nonfaces=2", "demo.photos=2", "demo.eval_train_per_class=2",
         "demo.eval_test_per_class=2", "demo.seeds_per_class=2"]


def test_a_deployment_run_is_lvd_run_in_the_serving_directory(prefect_server, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the served process's directory is not the one the paths are relative to
    state = lvd_run(str(REPO / "configs" / "tiny.yaml"), ["run.root=runs", "run.stop_after=crawl"], str(tmp_path),
                    return_state=True)  # fmt: skip
    assert state.is_completed(), state.message
    summary = state.result()
    run = RunDir(tmp_path / "runs", summary["run_id"])
    assert run.path.is_dir() and not (REPO / "runs" / summary["run_id"]).exists()
    assert read_manifest(run.stage_dir("crawl")) is not None
    assert [r["state"] for r in summary["stages"] if r["stage"] == "crawl"] == ["completed"]


def test_a_configuration_with_problems_fails_the_flow_run_with_every_problem(prefect_server, tmp_path):
    state = lvd_run(str(REPO / "configs" / "own_folder.yaml"), [f"run.root={tmp_path / 'runs'}",
                    f"data.url_list={tmp_path / 'missing.parquet'}"], str(tmp_path), return_state=True)  # fmt: skip
    assert state.is_failed()
    assert f"data.url_list: {tmp_path / 'missing.parquet'} does not exist" in state.message, state.message
    assert not (tmp_path / "runs").exists()


def test_lvd_serve_needs_a_prefect_server_that_stays_up(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: ""}):
        assert cli(["serve", str(REPO / "configs" / "tiny.yaml")]) == 2
    assert "PREFECT_API_URL: lvd serve needs a Prefect server that stays up" in capsys.readouterr().err


def test_served_runs_cancelled_in_prefect_killed_or_started_while_one_works(prefect_server, tmp_path):
    """`lvd serve` and flow runs of its deployment, as the UI starts and cancels them:
    - a cancellation (the flow run set Cancelling, as the UI's Cancel does; Prefect's runner in `lvd serve` then stops
      its process) is recorded as one, in the stage it stopped (no stage failure), and the pipeline's flow run is
      Cancelled; the run was held under the deployment's name meanwhile;
    - two runs started at once: the second waits for the first (the deployment takes one at a time);
    - the first killed (SIGKILL): its reaper records the end and marks its pipeline flow run Crashed in Prefect (the
      runner marks the deployment's), and the waiting run then continues the run;
    - Ctrl-C in the terminal of `lvd serve` stops it and the run it works on, recorded, both flow runs Cancelled."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    from infra.history import CANCELLED, attempts, describe
    from infra.run_lock import holder

    root = tmp_path / "runs"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO),
           "PREFECT_LOGGING_LEVEL": "WARNING"}  # fmt: skip
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(REPO / "configs" / "tiny.yaml"),
                              f"run.root={root}", "run.run_id=served", "run.stop_after=ingest", *SMALL],
                             env=env, cwd=tmp_path, start_new_session=True)  # fmt: skip
    run = RunDir(root, "served")

    def wait_for(what, seconds=240.0):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert serve.poll() is None, f"lvd serve ended with {serve.returncode}"
            if (found := what()) is not None:
                return found
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what.__doc__}")

    def in_ingest(attempt):
        def started():
            """an attempt to start ingest"""
            history = attempts(run) if run.path.is_dir() else []
            return True if len(history) >= attempt and "ingest" in history[attempt - 1].stages else None
        return started

    try:
        with get_client(sync_client=True) as client:
            def deployment():
                """the deployment"""
                try:
                    return client.read_deployment_by_name("lvd-run/tiny")
                except Exception:
                    return None

            def ended(flow_run_id, state_type):
                def check():
                    """a flow run's end"""
                    state = client.read_flow_run(flow_run_id).state
                    return state if state.type.value == state_type else None
                return check

            dep = wait_for(deployment)
            limit = dep.concurrency_options
            assert dep.global_concurrency_limit.limit == 1 and limit.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE

            first = client.create_flow_run_from_deployment(dep.id)
            wait_for(in_ingest(1))
            by = f"Prefect deployment lvd-run/tiny (flow run {str(first.id)[:8]})"
            assert holder(run.path).command == by
            client.set_flow_run_state(first.id, Cancelling(), force=True)  # the UI's Cancel
            t0 = time.monotonic()
            wait_for(ended(first.id, "CANCELLED"), 90.0)
            assert time.monotonic() - t0 < 60  # (Prefect's runner kills a process still there after 30 s)
            history = attempts(run)
            assert [(a.by, a.interrupted, a.stopped_in) for a in history] == [(by, CANCELLED, "ingest")]
            assert describe(history)[0]["ended"] == "cancelled in Prefect in ingest"
            events = run.events()
            assert not any(e["event"] in ("failed", "process_lost") for e in events), events
            pipeline_runs = [e["prefect_flow_run"] for e in events if e["event"] == "flow_started"]
            state = client.read_flow_run(pipeline_runs[0]).state
            assert state.is_cancelled() and state.message.startswith("cancelled in Prefect; `lvd resume served"), state

            second, third = (client.create_flow_run_from_deployment(dep.id) for _ in range(2))
            wait_for(in_ingest(2))
            working = holder(run.path)
            if str(third.id)[:8] in working.command:  # (the runner took the other one first)
                second, third = third, second
            assert client.read_flow_run(third.id).state.name == "AwaitingConcurrencySlot"
            os.kill(working.pid, signal.SIGKILL)
            wait_for(ended(second.id, "CRASHED"), 60.0)
            wait_for(in_ingest(3))
            pipeline_runs = [e["prefect_flow_run"] for e in run.events() if e["event"] == "flow_started"]
            state = client.read_flow_run(pipeline_runs[1]).state
            assert state.type.value == "CRASHED" and "its reaper recorded the end" in state.message, state

            os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C in the terminal of `lvd serve`, the third run working
            assert serve.wait(60) == 0
            history = attempts(run)
            assert [(a.by[-18:], a.stopped_in, a.interrupted) for a in history] == [
                (by[-18:], "ingest", CANCELLED), (f"flow run {str(second.id)[:8]})", "ingest", None),
                (f"flow run {str(third.id)[:8]})", "ingest", "SIGINT")]
            assert history[1].lost is not None and describe(history)[1]["ended"].startswith("killed or crashed in ingest")
            assert history[2].stages["crawl"].outcome == "cached"  # (it continued the run)
            # Both of its flow runs Cancelled: the runner stopped with `lvd serve`, so the process marked the
            # deployment's too.
            assert [client.read_flow_run(f).state.type.value for f in (third.id, pipeline_runs[2])] == ["CANCELLED"] * 2
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGINT)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
