"""Per-shard fan-out of a stage through a Prefect task runner (one task run per shard).

A stage core takes a *mapper* ``(fn, [args, ...]) -> results as they finish``; this module supplies one that
submits ``fn(*args)`` as Prefect task runs on the run's task runner: Prefect's ``ThreadPoolTaskRunner`` by
default, ``prefect_dask.DaskTaskRunner`` with ``run.task_runner=dask`` (a local cluster of the stage's width of
single-threaded worker processes, or the scheduler at ``run.dask_address``), ``prefect_ray.RayTaskRunner`` with
``run.task_runner=ray`` (a local Ray with that many CPUs, or the cluster at ``run.ray_address``); the width is
``run.workers``, ``ingest.processes`` for ingest, and for NSFW no more than the memory holds. Each shard's
task run is retried ``run.shard_retries`` times and limited to ``run.shard_timeout_s`` per attempt. ``fn`` must be a
module-level function of files and small config objects (it is pickled to the workers); the core marks shards done
as results come back, so an interrupted stage resumes at the shard.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import PurePath
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.cluster import address, require_worker, worker_expectation
from infra.config.run import RunConfig
from infra.cpus import resolve


@task(cache_policy=NO_CACHE, persist_result=False)
def shard_task(fn: Callable[..., Any], args: tuple[Any, ...], worker: dict[str, Any] | None = None) -> Any:
    """``fn(*args)``; ``worker``: what a worker of a cluster at an address must be (`flows.cluster.require_worker`:
    the submitting `lvd`'s code, its runs folder, its libraries): one that joined after the start-up check, or was
    restarted, fails the shard with its name and the fix instead of computing it with other code than the stage's
    key records, or failing on a file it cannot see."""
    from infra.console import forward_to_prefect, quiet_worker_console

    forward_to_prefect()  # on a Dask or Ray worker too: what the shard logs goes to its task run
    quiet_worker_console()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # as `lvd` sets it: a worker's environment is its own
    if worker is not None:
        require_worker(worker)
    return fn(*args)


def shard_name(args: tuple[Any, ...]) -> str:
    """The shard a job works on: the first argument with a `name` (a shard, an ingest job) or a `shard`, paths aside
    (a stage folder's name is the stage's)."""
    for arg in args:
        if isinstance(arg, PurePath):
            continue
        name = getattr(arg, "name", None) or getattr(getattr(arg, "shard", None), "name", None)
        if isinstance(name, str):
            return name
    return "shard"


def task_runner(run: RunConfig, width: int) -> Any:
    """The runner of a stage's shards, `width` at a time: threads, or a local Dask or Ray cluster of that many
    workers (`ingest.processes` for ingest, what the memory holds for NSFW: `flows.stages.memory_width`, else
    `run.workers`), or the cluster at `run.dask_address` / `run.ray_address` as it is."""
    if run.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise ImportError("run.task_runner=dask needs `pip install prefect-dask dask[distributed]`") from err
        if run.dask_address:
            return DaskTaskRunner(address=run.dask_address)
        # The local scheduler runs in this process, and `distributed` logs at INFO: ~30 lines per stage on the
        # console (scheduler and nanny start and stop, worker registration); its warnings still show.
        logging.getLogger("distributed").setLevel(logging.WARNING)
        return DaskTaskRunner(cluster_kwargs={"n_workers": width, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})  # fmt: skip
    if run.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as err:
            raise ImportError("run.task_runner=ray needs `pip install prefect-ray`") from err
        if run.ray_address:
            return RayTaskRunner(address=run.ray_address)
        return RayTaskRunner(init_kwargs={"num_cpus": width, "include_dashboard": False})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=width)


def ray_gpus(run: RunConfig) -> float:
    """GPUs a Ray shard task of a model stage reserves (`run.ray_gpus_per_task`; None: 1 on a CUDA host, else 0)."""
    if run.ray_gpus_per_task is not None:
        return run.ray_gpus_per_task
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def prefect_mapper(run: RunConfig, stage: str, width: int | str | None = None,
                   gpu: bool = False) -> Callable[..., Iterator[Any]]:
    """A mapper for stage cores: shards as task runs named ``<stage>[<shard>]``, results as they complete. ``gpu``:
    the tasks run a model, and on Ray reserve :func:`ray_gpus` each (Ray shows a task only the GPUs it reserved)."""

    def mapper(fn: Callable[..., Any], items: list[tuple[Any, ...]]) -> Iterator[Any]:
        if not items:
            return
        _start_prefect()
        worker = worker_expectation(run) if address(run) is not None else None  # a local cluster runs this checkout
        with _report_here(run), task_runner(run, resolve(width or run.workers)) as runner, _ray_options(run, gpu):
            futures = []
            for args in items:
                t = shard_task.with_options(name=f"{stage}-shard", task_run_name=f"{stage}[{shard_name(args)}]",
                                            retries=run.shard_retries, retry_delay_seconds=run.shard_retry_delay_s,
                                            timeout_seconds=run.shard_timeout_s)
                futures.append(runner.submit(t, parameters={"fn": fn, "args": args, "worker": worker}))
            for future in as_completed(futures):
                yield future.result()

    return mapper


def _start_prefect() -> None:
    """Prefect's API client (and, outside a flow without PREFECT_API_URL, its ephemeral server) made here, before
    the shard threads: each shard's task run asks for a client, and Prefect's `SubprocessASGIServer.start` is not
    thread-safe: a second thread saw the server "running" before its process existed and failed the shard with
    "Server process did not start" (a stage run outside a flow with two shards in flight; within a flow the flow's
    own start has made it)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True):
        pass


def _report_here(run: RunConfig) -> AbstractContextManager[Any]:
    """The workers of a local Dask or Ray cluster report their shards' task runs and logs to this run's Prefect
    server. An explicit PREFECT_API_URL reaches any worker in each task's settings context (Prefect serialises it with
    the task); the embedded server's address is not a setting (its port is chosen when it starts), so before, every
    worker process started a temporary Prefect server of its own (~7 s and ~300 MB, once per stage and worker
    process), which wrote the shards' task runs into the machine's Prefect database through a second server. A local
    cluster's workers live for one stage, so they are given the embedded server's address. The long-lived workers of
    a cluster at an address are not: Prefect keeps per-process services (tag concurrency slots, logs, events) bound to
    the first server a process used, and the next run's embedded server has another port (tried: the second run's
    first shard failed with ConcurrencySlotAcquisitionError after 2 minutes). Their shards are recorded as before, and
    a note says how to have them in the run's UI."""
    url = _embedded_api_url() if run.task_runner != "thread" else None
    if url is None:
        return nullcontext()
    if (where := address(run)) is not None:
        if where not in _NOTED:
            _NOTED.append(where)
            logging.getLogger("lvd").info(
                "the workers at %s record the shards' task runs through a Prefect server of their own (a temporary "
                "one per worker process, into their machine's PREFECT_HOME); to have them in this run's Prefect UI, "
                "run a Prefect server every worker reaches (`prefect server start --host 0.0.0.0`) and set "
                "PREFECT_API_URL=http://HOST:4200/api for lvd and the workers", where)
        return nullcontext()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: url})


_NOTED: list[str] = []  # cluster addresses noted in this process


def _embedded_api_url() -> str | None:
    """The address of this process's embedded (ephemeral) Prefect server; None where PREFECT_API_URL names one."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    return server.api_url if server.running else None


def _ray_options(run: RunConfig, gpu: bool) -> AbstractContextManager[Any]:
    gpus = ray_gpus(run) if run.task_runner == "ray" and gpu else 0.0
    if not gpus:
        return nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=gpus)
