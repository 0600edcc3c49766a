"""``lvd retry-failed``: re-download only the failed URLs of a finished ingest, as a Prefect flow.

Which rows: by default those whose reason is of class ``transient`` in :mod:`curation.reasons` (timeouts, 408,
429, 5xx, connection and DNS errors); given reasons may also name ``permanent`` download failures (``http_404``);
``policy`` reasons and those decided without downloading are refused.

The retried rows go into new shards ``stages/ingest/shards/r<attempt>-<shard>`` (finished shards are never
rewritten); the ingest manifest is rewritten with the new outputs and counts, which changes its digest, so the
next ``lvd resume`` redoes every later stage (NSFW, faces, dedup, ...) and nothing before it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow

from curation.ingest import retry_failed
from flows.fanout import prefect_mapper
from flows.stages import active_stages
from infra import run_lock
from infra.config import PipelineConfig
from infra.console import forward_to_prefect
from infra.demo.server import DemoServer
from infra.history import attempts
from infra.manifest import read_manifest, write_manifest
from infra.run import RunDir, now
from infra.stage import ShardTracker, stage_state
from infra.storage import file_record


class RetryError(RuntimeError):
    pass


@contextlib.contextmanager
def _demo_server(run: RunDir, cfg: PipelineConfig) -> Iterator[None]:
    if not cfg.demo.enabled:
        yield
        return
    with DemoServer(run.stage_dir("crawl") / "images", cfg.demo.port, cfg.demo.slow_seconds):
        yield


def flow_run_name() -> str:
    """`<run id> attempt <n> (retry-failed)`, numbered with the run's other attempts (`lvd status`)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    run = RunDir(Path(params["run_root"]), params["run_id"])
    return f"{run.run_id} attempt {len(attempts(run)) + 1} (retry-failed)"


@flow(name="lvd-retry-failed", flow_run_name=flow_run_name)
def retry_failed_flow(run_root: str, run_id: str, reasons: list[str] | None = None) -> dict[str, Any]:
    forward_to_prefect()
    run = RunDir(Path(run_root), run_id)
    with run_lock.writing(run.path, "the lvd-retry-failed flow"):  # (held already when `lvd retry-failed` starts it)
        return _retry_flow(run, run_id, reasons)


def _retry_flow(run: RunDir, run_id: str, reasons: list[str] | None) -> dict[str, Any]:
    cfg = run.load_config()
    spec = next(s for s in active_stages(cfg) if s.name == "ingest")
    if stage_state(run, spec, cfg) != "completed":
        raise RetryError(f"ingest of run {run_id!r} is not complete (or is stale): run `lvd resume {run_id}` first")
    run.log_event("retry_started", "ingest", reasons=reasons)  # the shard events that follow are this retry's
    try:
        return _retry(run, cfg, reasons)
    except BaseException as err:
        with contextlib.suppress(OSError):  # the disk may be full or read-only: keep the original error
            run.log_event("retry_failed", "ingest", error=f"{type(err).__name__}: {err}")
        raise


def _retry(run: RunDir, cfg: PipelineConfig, reasons: list[str] | None) -> dict[str, Any]:
    stage_dir = run.stage_dir("ingest")
    manifest = read_manifest(stage_dir)
    assert manifest is not None
    tracker = ShardTracker("ingest", stage_dir, run)
    with _demo_server(run, cfg):
        try:
            plan, result = retry_failed(stage_dir, cfg.ingest, tracker, reasons,
                                        prefect_mapper(cfg.run, "ingest", cfg.ingest.processes))  # fmt: skip
        except BaseException:
            tracker.close(failed=True)
            raise
        tracker.close()
    retries = [*manifest.extra.get("retries", []),
               {"attempt": plan.attempt, "rows": len(plan.rows), "reasons": reasons, "at": now()}]  # fmt: skip
    updated = manifest.model_copy(
        update={
            "counts": result.counts,
            "outputs": [file_record(p, run.path) for p in sorted(set(result.outputs))],
            "extra": {**result.extra, "retries": retries},
            "finished_at": now(),
        }
    )
    write_manifest(stage_dir, updated)
    recovered = int(result.counts.get("downloaded", 0)) - int(manifest.counts.get("downloaded", 0))
    run.log_event("retried", "ingest", attempt=plan.attempt, rows=len(plan.rows), recovered=recovered)
    return {"attempt": plan.attempt, "retried": len(plan.rows), "recovered": recovered,
            "by_reason": plan.rows["reason"].value_counts().to_dict(), "shards": [j.name for j in plan.jobs]}  # fmt: skip
