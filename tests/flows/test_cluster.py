"""A Dask or Ray cluster given by address is asked, before any stage runs, what its workers see (`flows.cluster`), and
its workers report their shards to the run's own Prefect server (`flows.fanout`)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flows import cluster
from flows.cluster import cluster_problems, worker_facts
from infra.config import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scheduler():
    """A Dask scheduler with one worker process, addressed as a user's cluster is (`run.dask_address`)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.WARNING) as c:  # fmt: skip
        yield c.scheduler_address


def _cfg(tmp_path: Path, address: str, *overrides: str):
    return load_config(None, [f"run.root={tmp_path / 'runs'}", "run.run_id=r", "run.task_runner=dask",
                              f"run.dask_address={address}", *overrides])  # fmt: skip


def test_workers_that_see_the_run_and_run_this_code_pass(tmp_path, scheduler):
    (tmp_path / "photos").mkdir()
    model = tmp_path / "sscd.onnx"
    model.write_bytes(b"x" * 1000)
    cfg = _cfg(tmp_path, scheduler, f"ingest.local_roots=[{tmp_path / 'photos'}]", f"dedup.descriptor.path={model}")
    assert cluster.worker_files(cfg) == {str(tmp_path / "photos"): None, str(model): 1000}
    assert cluster_problems(cfg, tmp_path / "runs" / "r", {"ingest", "embed"}) == []
    assert not list(tmp_path.glob(f"{cluster.PROBE}*"))  # the probe is removed
    # Stages that do not fan out ask nothing (this address would fail to connect).
    assert cluster_problems(_cfg(tmp_path, "tcp://127.0.0.1:1"), tmp_path, {"pretrain", "evaluate"}) == []


def test_a_worker_that_cannot_see_the_run_or_its_files_is_named_with_the_fix(tmp_path):
    """What a worker on another machine reports (its facts, computed by the same function) becomes problems."""
    probe, token = tmp_path / f"{cluster.PROBE}abc", "abc"
    model = tmp_path / "m.onnx"
    model.write_bytes(b"12345")
    mine = {"code": cluster.code_digest(), "libraries": cluster.libraries()}
    files = {str(model): 5, str(tmp_path / "gone"): None}
    seen = worker_facts(str(probe), token, files)  # no probe file there
    problems = cluster._differences(seen, mine, token, tmp_path, files)
    assert problems == [
        f"does not see the run's folder ({tmp_path}: No such file or directory there): the runs folder (run.root) "
        "must be on storage every worker mounts at the same path",
        f"does not see {tmp_path / 'gone'}, which its shards read: the same paths must reach the same files on every "
        "worker"]
    probe.write_text(token)
    model.write_bytes(b"123")  # another file by the same name
    seen = worker_facts(str(probe), token, {str(model): 5})
    other = {**seen, "code": "0" * 16, "libraries": {**seen["libraries"], "numpy": "0.1"}}
    assert cluster._differences(other, mine, token, tmp_path, {str(model): 5}) == [
        f"sees another {model} (another size than here)",
        f"runs other code than this lvd (source digest {'0' * 16} vs {mine['code']}): install the same checkout or "
        "version on every worker",
        f"has other libraries: numpy 0.1 (here {mine['libraries']['numpy']}): the same versions on every worker keep "
        "what a stage computes the same"]
    assert cluster._differences(ModuleNotFoundError("No module named 'flows'"), mine, token, tmp_path, {}) == [
        "could not run this project's check (ModuleNotFoundError: No module named 'flows'): start the workers from "
        "the environment lvd runs in (the same virtual environment, this project installed)"]


def test_a_module_imported_before_its_file_changed_is_stale(tmp_path):
    path = tmp_path / "mod_stale.py"
    path.write_text("LIMIT = 3\n\n\ndef f(x):\n    return x + LIMIT\n")
    spec = importlib.util.spec_from_file_location("mod_stale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not cluster._differs(module, path)
    path.write_text("# a comment\nLIMIT = 3\n\n\ndef f(x):  # same code, other lines\n    return x + LIMIT\n")
    assert not cluster._differs(module, path)
    path.write_text("LIMIT = 4\n\n\ndef f(x):\n    return x + LIMIT\n")
    assert cluster._differs(module, path)  # a module constant
    path.write_text("LIMIT = 3\n\n\ndef f(x):\n    return x + LIMIT + 0.5\n")
    assert cluster._differs(module, path)  # a function's constants


def test_an_unreachable_scheduler_and_one_without_workers_are_refused(tmp_path, monkeypatch):
    from distributed import LocalCluster

    from infra.demo.server import free_port

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2.0)
    gone = f"tcp://127.0.0.1:{free_port()}"
    (problem,) = cluster_problems(_cfg(tmp_path, gone), tmp_path, {"ingest"})
    assert problem.startswith(f"run.dask_address: {gone}: no Dask scheduler answers there (OSError: ")
    ray_gone = f"127.0.0.1:{free_port()}"
    ray_cfg = load_config(None, [f"run.root={tmp_path}", "run.task_runner=ray", f"run.ray_address={ray_gone}"])
    assert cluster_problems(ray_cfg, tmp_path, {"embed"}) == [
        f"run.ray_address: {ray_gone}: no Ray cluster answers there (ConnectionRefusedError: Connection refused); "
        "start one with `ray start --head`, or leave run.ray_address empty for a local Ray; a cluster that `ray start` "
        "said uses token authentication also needs RAY_AUTH_MODE=token in lvd's environment"]
    with LocalCluster(n_workers=0, dashboard_address=None, silence_logs=logging.WARNING) as c:
        assert cluster_problems(_cfg(tmp_path, c.scheduler_address), tmp_path, {"nsfw"}) == [
            f"run.dask_address: {c.scheduler_address}: the scheduler has no workers (waited 2 s): start them with "
            f"`dask worker {c.scheduler_address}`"]


def where_i_report(_: int) -> dict:
    """A shard's task on a worker: which Prefect API its task run reports to, and whether it started its own server."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    return {"pid": os.getpid(), "api": str(PREFECT_API_URL.value()),
            "own_server": SubprocessASGIServer().running}


def test_dask_workers_report_to_the_runs_embedded_prefect_server(tmp_path, prefect_home):
    """Without PREFECT_API_URL (the embedded server, as `lvd` runs by default) the shard task runs of a local Dask
    cluster's workers report to the flow process's server: no temporary server of their own (~7 s and ~300 MB each
    before), and the task runs are in the run's database."""
    script = textwrap.dedent("""
        import json, os
        from prefect.server.api.server import SubprocessASGIServer
        from flows.fanout import prefect_mapper
        from infra.config.run import RunConfig
        from tests.flows.test_cluster import where_i_report
        out = list(prefect_mapper(RunConfig(task_runner="dask", workers=1), "probe")(where_i_report, [(0,), (1,)]))
        print(json.dumps({"pid": os.getpid(), "api": SubprocessASGIServer().api_url, "shards": out}))
    """)
    env = {**os.environ, "PREFECT_HOME": str(prefect_home(tmp_path / "home")), "PYTHONPATH": str(REPO),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_LOGGING_LEVEL": "INFO"}  # as lvd sets it
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(seen["shards"]) == 2
    for shard in seen["shards"]:
        assert shard["pid"] != seen["pid"]  # on a worker process
        assert shard["api"].rstrip("/") == seen["api"].rstrip("/") and not shard["own_server"]
    assert proc.stderr.count("Starting temporary server") == 1, proc.stderr[-3000:]  # this process's, none per worker
    # The console: neither the local scheduler's INFO lines nor the workers' task-run states (the run's logs have them).
    assert "distributed.scheduler" not in proc.stderr and "Finished in state" not in proc.stderr, proc.stderr[-3000:]


def test_shards_on_a_cluster_by_address_run_only_on_workers_with_lvds_code(scheduler, prefect_server, tmp_path):
    """Each shard's task carries lvd's source digest: a worker that joined after the start-up check, or was restarted
    from other code, fails the shard with its name and the fix."""
    from flows.fanout import prefect_mapper
    from infra.config.run import RunConfig

    run = RunConfig(task_runner="dask", dask_address=scheduler, root=tmp_path)
    (shard,) = prefect_mapper(run, "probe")(where_i_report, [(0,)])
    assert shard["pid"] != os.getpid()  # on the cluster's worker, its code, runs folder and libraries checked
    here = cluster.worker_expectation(run)
    assert here == {"code": cluster.code_digest(), "root": str(tmp_path), "libraries": cluster.libraries()}
    cluster.require_worker(here)
    host = rf"{re.escape(socket.gethostname())} \(pid {os.getpid()}\)"
    with pytest.raises(RuntimeError, match=rf"^worker {host} runs other code than lvd \(source digest "
                                           r"[0-9a-f]{16} vs 0{16}\): install the same checkout or version on every "
                                           r"worker$"):  # fmt: skip
        cluster.require_worker({**here, "code": "0" * 16})
    # A worker that joined after the start-up check (autoscaling) and does not mount the run's storage, or has
    # other libraries: its shard fails with the worker and the fix, not with a missing file deep in the stage.
    with pytest.raises(RuntimeError, match=rf"^worker {host} does not see the runs folder {tmp_path / 'gone'} "
                                           r"\(run.root\): it must be on storage every worker mounts at the same "
                                           r"path$"):  # fmt: skip
        cluster.require_worker({**here, "root": str(tmp_path / "gone")})
    with pytest.raises(RuntimeError, match=rf"^worker {host} has other libraries: numpy {re.escape(np.__version__)} "
                                           r"\(here 0.1\): the same versions on every worker keep what a stage "
                                           r"computes the same$"):  # fmt: skip
        cluster.require_worker({**here, "libraries": {**here["libraries"], "numpy": "0.1"}})
