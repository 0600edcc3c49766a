"""The curate-then-train pipeline as one Prefect flow: one task run per stage, in order.

Resume has two layers. Inside a stage, completed shards are skipped by their markers (``infra.stage``). Across
runs, each stage task is cached by Prefect under the stage key (config hash + code version + upstream manifest
digest) with its result persisted in the run directory, so re-running a completed run is all cache hits; a
failed run resumed with ``lvd resume`` redoes nothing before the stage that failed.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import flow, tags, task
from prefect.client.schemas.objects import State
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem
from prefect.runtime import flow_run as prefect_flow_run

from flows.artifacts import prefect_name, publish, stage_markdown, summary_markdown
from flows.stages import active_stages, complete_exports, training_stages
from infra import run_lock
from infra.config import PipelineConfig
from infra.console import forward_to_prefect
from infra.demo.server import DemoServer
from infra.history import attempts_from
from infra.manifest import read_manifest
from infra.memory import release_stage_memory
from infra.prefect_runs import close_dead_attempts
from infra.run import RunDir
from infra.runs import RUN_INFO
from infra.stage import StageInputError, StageSpec, run_stage, stage_key, stage_state
from infra.stopping import hold_if_stopping
from infra.storage import read_json
from infra.summary import run_summary

RESULTS_DIR = ".prefect-results"
log = logging.getLogger("lvd")


def _spec(cfg: PipelineConfig, name: str) -> StageSpec:
    return next(s for s in active_stages(cfg) if s.name == name)


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The stage key when it can be computed; a stored result for it is dropped unless the stage is complete."""
    run = RunDir(Path(parameters["run_root"]), parameters["run_id"])
    cfg = run.load_config()
    spec = _spec(cfg, parameters["stage"])
    try:
        key = stage_key(spec, run, cfg)
    except StageInputError:
        return None
    manifest = read_manifest(run.stage_dir(spec.name))
    if manifest is None or manifest.key != key:
        # Outputs are gone or stale: a cached result would point at files that do not exist.
        (run.path / RESULTS_DIR / key).unlink(missing_ok=True)
    return key


@task(persist_result=True, result_serializer="json", cache_key_fn=stage_cache_key)
def stage_task(run_root: str, run_id: str, stage: str) -> dict[str, Any]:
    run = RunDir(Path(run_root), run_id)
    cfg = run.load_config()
    manifest = run_stage(_spec(cfg, stage), run, cfg)
    publish(stage_markdown(run, manifest), f"{stage} of run {run_id}")  # the task run's Artifacts tab
    return manifest.model_dump(mode="json")


@contextlib.contextmanager
def demo_server(spec: StageSpec, run: RunDir, cfg: PipelineConfig) -> Iterator[None]:
    """The demo crawl is served on 127.0.0.1 only while ingest has work to do."""
    if spec.name != "ingest" or not cfg.demo.enabled or stage_state(run, spec, cfg) == "completed":
        yield
        return
    with DemoServer(run.stage_dir("crawl") / "images", cfg.demo.port, cfg.demo.slow_seconds):
        yield


def result_storage(run: RunDir) -> LocalFileSystem:
    """Task results persist inside the run directory (a block saved on the server, as Prefect requires)."""
    storage = LocalFileSystem(basepath=str((run.path / RESULTS_DIR).resolve()))
    storage.save(prefect_name(run.run_id), overwrite=True)
    return storage


def face_blur(cfg: PipelineConfig) -> Callable[[bytes], bytes]:
    """The run's face detection and blurring (its `faces` section) as bytes -> PNG bytes: the report shows seed and
    evaluation images only through it, as the pool's images are shown only as the faces stage stored them."""
    from curation.faces import blur_boxes, detector_for, expand
    from infra.images import decode

    def blur(data: bytes) -> bytes:
        img = decode(data)
        boxes = [expand(b, cfg.faces.margin, img.size) for b in detector_for(cfg.faces).detect(img)]
        buf = io.BytesIO()
        (blur_boxes(img, boxes, cfg.faces.blur) if boxes else img).save(buf, "PNG")
        return buf.getvalue()

    return blur


def write_report(run: RunDir) -> Path:
    """The run's HTML report, rebuilt from the run directory (cheap, so never cached; not a stage: it has no
    outputs other stages read, and `lvd report` rebuilds it for any run)."""
    from evaluation.report import build_report

    path = build_report(run.path, blur=face_blur(run.load_config()))
    run.log_event("report_written", path=str(path))
    return path


def flow_run_name() -> str:
    """`<run id> attempt <n>`: the attempt this flow run starts, numbered as `lvd status` and the report number them."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    run = RunDir(Path(params["run_root"]), params["run_id"])
    return f"{run.run_id} attempt {attempt_number(run.events())}"


def attempt_number(events: list[dict[str, Any]]) -> int:
    """The number of the attempt whose flow starts now: the attempts so far, plus one unless the last of them is this
    process's own, opened by the CLI's `launched` event before Prefect started (its flow not yet started)."""
    starts = [e.get("event") for e in events if e.get("event") in ("launched", "flow_started", "retry_started")]
    return len(attempts_from(events)) + (0 if starts and starts[-1] == "launched" else 1)


def run_tags(run: RunDir, cfg: PipelineConfig) -> list[str]:
    """The flow run's tags: `lvd`, `config:<config file name>` and `stage:<name>` for each stage it runs."""
    info = read_json(run.path / RUN_INFO) if (run.path / RUN_INFO).is_file() else {}
    config = Path(info["config_file"]).stem if info.get("config_file") else "none"
    return ["lvd", f"config:{config}", *(f"stage:{s.name}" for s in active_stages(cfg))]


def run_pipeline(run_root: str, run_id: str) -> State:
    """Start (or resume) the run's flow with its tags; the final state, as `pipeline(..., return_state=True)`."""
    run = RunDir(Path(run_root), run_id)
    with tags(*run_tags(run, run.load_config())):
        return pipeline(run_root, run_id, return_state=True)


@flow(name="lvd-pipeline", flow_run_name=flow_run_name)
def pipeline(run_root: str, run_id: str) -> dict[str, Any]:
    forward_to_prefect()  # the stages' log lines in the flow run's Logs tab
    run = RunDir(Path(run_root), run_id)
    with run_lock.writing(run.path, "the lvd-pipeline flow"):  # (held already when `lvd run` / `lvd resume` start it)
        return _pipeline(run)


def _pipeline(run: RunDir) -> dict[str, Any]:
    cfg = run.load_config()
    storage = result_storage(run)
    run.log_event("flow_started", prefect_flow_run=str(prefect_flow_run.id))  # the attempt's run in Prefect
    close_dead_attempts(run, str(prefect_flow_run.id))  # (their processes are gone: this one holds the run)
    try:
        _stages(run, cfg, storage)
    finally:  # (a failed stage too: the summary says which, in the Prefect UI as on the console)
        summary = _publish_summary(run, cfg)
    return summary if summary is not None else run_summary(run, cfg)


def _publish_summary(run: RunDir, cfg: PipelineConfig) -> dict[str, Any] | None:
    """The run's summary as the flow run's artifact (`lvd-<run id>`, a version per attempt); None where it could not
    be made (the error the flow is raising, if any, is the one to see)."""
    try:
        summary = run_summary(run, cfg)
    except Exception as e:
        log.warning("no run summary for Prefect: %s", e)
        return None
    attempt = len(attempts_from(run.events()))
    publish(summary_markdown(summary), f"run {run.run_id}, attempt {attempt}", key=prefect_name(run.run_id))
    return summary


def _stages(run: RunDir, cfg: PipelineConfig, storage: LocalFileSystem) -> None:
    for spec in active_stages(cfg):
        hold_if_stopping()  # (Ctrl-C as the previous stage ended: nothing more starts or is recorded)
        if stage_state(run, spec, cfg) == "completed":
            # Completed by an earlier attempt: Prefect's cache hit below runs no task body, so the run's history
            # records the reuse here ("skipped" when the body runs anyway and finds the manifest).
            run.log_event("reused", spec.name)
            log.info("%s: completed by an earlier attempt, reused", spec.name)
        task_ = stage_task.with_options(name=spec.name, task_run_name=spec.name, result_storage=storage)
        release_stage_memory()  # what earlier stages' models held, before this one's peak
        with demo_server(spec, run, cfg):
            task_(str(run.root), run.run_id, spec.name)
        if spec.name in training_stages(cfg) and (added := complete_exports(run, cfg, spec.name)):
            log.info("%s: %s export%s written (the stage was exported without)", spec.name, ", ".join(added),
                     "s" if len(added) > 1 else "")  # fmt: skip
    hold_if_stopping()
    run.log_event("stages_completed")  # before the report, which shows the run's attempts (this one completed)
    if cfg.evaluate.report:
        log.info("report: %s", write_report(run))
    run.log_event("flow_completed")

