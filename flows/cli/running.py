"""`lvd run`, `lvd resume` and `lvd retry-failed`: the commands that start Prefect flows."""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra import run_lock
from infra.config import ConfigError

if TYPE_CHECKING:
    from infra.config import PipelineConfig
    from infra.run import RunDir

# Seconds Prefect gets, once a flow's own work has ended, to record it at its API before the process exits anyway
# (see ExitWatchdog).
TIMEOUT_ENV = "LVD_PREFECT_EXIT_TIMEOUT"
TIMEOUT_DEFAULT = 60.0


def check_environment() -> None:
    """The `dataclasses` backport (pulled by img2dataset) breaks Prefect's API server; refuse early."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("dataclasses")
    except PackageNotFoundError:
        return
    raise SystemExit("the `dataclasses` backport is installed and breaks Prefect's server: pip uninstall -y dataclasses")


def _api_url() -> str:
    return _own_api_url() or "(the embedded server)"


def _own_api_url() -> str | None:
    """The Prefect server given by `PREFECT_API_URL` (environment or profile); None: the embedded one."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def _flush_prefect() -> None:
    """Stop Prefect's event and log services once they have delivered what they hold (what Prefect otherwise does at
    interpreter exit, with no time limit: `ExitWatchdog` bounds it)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        service.drain_all(at_exit=False)


class ExitWatchdog(threading.Thread):
    """Bounds the time from the end of a flow's own work to the process exit.

    With the Prefect API server gone, Prefect retries the final state for ~1 minute per call (twice: Completed, then
    Failed), and at exit retries each queued event for ~7-10 s: a run whose stages were all done did not exit for many
    minutes. The run's own record (events.jsonl, manifests, ledger) is on disk by then, so once the flow's work has
    ended (its `flow_completed` or a `failed` event, or the flow call returned) Prefect gets `timeout` seconds
    (LVD_PREFECT_EXIT_TIMEOUT) to finish; then the process exits anyway, saying why.
    """

    def __init__(self, events: Path | None, timeout: float, resume: str):
        super().__init__(name="lvd-exit-watchdog", daemon=True)
        self.events, self.timeout, self.resume = events, timeout, resume
        self.offset = events.stat().st_size if events is not None and events.is_file() else 0
        self.ended: str | None = None  # what ended the flow's work
        self.code = 1  # exit status while Prefect has not returned the flow's final state
        self.deadline: float | None = None
        self.finished = threading.Event()
        self.context = contextvars.copy_context()  # the starter's Prefect settings (its API URL), for the message

    def arm(self, ended: str, code: int | None = None) -> None:
        if self.deadline is None:
            self.deadline, self.ended = time.monotonic() + self.timeout, ended
        if code is not None:
            self.code = code

    def _read_events(self) -> None:
        if self.events is None or not self.events.is_file():
            return
        with open(self.events, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]  # whole lines only
        self.offset += len(data)
        for line in data.splitlines():
            try:
                event = json.loads(line).get("event")
            except json.JSONDecodeError:  # a line cut by an earlier crash
                continue
            if event in ("flow_completed", "failed"):
                self.arm("the flow completed its stages" if event == "flow_completed" else "a stage failed")

    def run(self) -> None:
        self.context.run(self._watch)

    def _watch(self) -> None:
        while not self.finished.wait(0.5):
            if self.deadline is None:
                self._read_events()
            elif time.monotonic() > self.deadline:
                self._expire()

    def _expire(self) -> None:
        print(f"\nlvd: {self.ended} {self.timeout:g} s ago, but Prefect has not finished recording the run at its API "
              f"{_api_url()} (is the server down?); exiting with status {self.code} without waiting for its retries "
              f"({TIMEOUT_ENV}). The run directory holds the run's own record; once the server is back, `{self.resume}` "
              "records the run in Prefect (completed stages are cache hits).", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(self.code)  # Prefect's exit flush is unbounded


def _exit_timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV) or TIMEOUT_DEFAULT)


def _run_flow(run_root: Path, run_id: str, command: str) -> int:
    from flows import interrupt
    from flows.attempt import launch
    from infra import reaper
    from infra.run import RunDir

    # The attempt, from here: a stop while Prefect is imported and its database and server start (seconds) is its
    # too, recorded in the run (`lvd status`: "interrupted ... before its first stage").
    run = RunDir(Path(run_root), run_id)
    resume = interrupt.resume_command(run_root, run_id)
    launch(run)
    interrupt.attach(run, resume)
    # If this process is killed (the out-of-memory killer, kill -9), its reaper stops what it started and records
    # the end; leaving the block below dismisses it.
    watched = contextlib.ExitStack()
    # (With a Prefect server of your own, which outlives this process, the reaper also marks its flow run Crashed.)
    watched.enter_context(reaper.watching(run.path, command, resume, prefect_api=_own_api_url()))

    import httpx

    from flows.pipeline import run_pipeline
    from infra.prefect_db import ensure_embedded_database
    from infra.runs import open_run
    from infra.summary import format_summary, run_summary

    watchdog = ExitWatchdog(run.events_path, _exit_timeout(), resume)
    watchdog.start()
    try:
        try:
            with interrupt.for_run(run_root, run_id):  # Ctrl-C / SIGTERM: recorded, children stopped, exit 130 / 143
                ensure_embedded_database()  # a server start killed mid-migration must not break every later resume
                state = run_pipeline(str(run_root), run_id)
        except httpx.HTTPError as err:  # Prefect's own API calls (flow run and its states), after Prefect's retries
            state = None
            message = (f"the Prefect API at {_api_url()} is unreachable ({type(err).__name__}: {err}); completed "
                       f"stages are kept in the run directory. Once the server is back, resume with: {resume}")
        code = 0 if state is not None and state.is_completed() else 1
        watchdog.arm("the flow returned", code)
        run, cfg = open_run(run_root, run_id)
        print(format_summary(run_summary(run, cfg)))
        if state is not None and code:
            message = f"{state.message}\nresume with: {resume}"
        if code:
            print(f"\nrun {run_id} failed: {message}", file=sys.stderr)
        _flush_prefect()
        return code
    finally:
        watchdog.finished.set()  # (an in-process caller, e.g. a test, must never be exited by it)
        watched.close()


def cmd_run(args: argparse.Namespace) -> int:
    from flows.preflight import check_run_inputs
    from infra.runs import prepare_run

    # Every problem at once, the URL list's and model files' included (opened and probed), before a run directory
    # exists.
    checks = functools.partial(check_run_inputs, remember=not args.dry_run)  # a dry run writes nothing
    run, cfg = prepare_run(args.config, args.overrides, checks=checks, write=not args.dry_run)
    if args.dry_run:
        return _dry_run(run, cfg)
    with run_lock.writing(run.path, "lvd run"):  # a second process on this run is refused (infra.run_lock)
        print(f"run {run.run_id} in {run.path}")
        return _run_flow(run.root, run.run_id, "lvd run")


def _dry_run(run: RunDir, cfg: PipelineConfig) -> int:
    from flows.dry_run import describe, dry_run, not_run

    print(f"run {run.run_id} in {run.path}{'' if run.exists() else ' (new)'}: what it would do (nothing is run)")
    if (live := run_lock.holder(run.path)) not in (None, run_lock.UNKNOWN):
        print(f"(it is running now: {live.describe()}; another process on it would be refused until it ends)")
    print(describe(dry_run(run, cfg) + not_run(cfg)))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from flows.preflight import preflight, remaining_stages
    from infra.runs import amend_run, open_run

    run, cfg = open_run(args.root, args.run_id)
    if args.dry_run:
        if args.overrides:
            raise ConfigError(["--dry-run shows what the run would do as it is configured: give no overrides"])
        return _dry_run(run, cfg)
    with run_lock.writing(run.path, "lvd resume"):  # before its configuration is amended
        for key, (old, new) in amend_run(run, args.overrides).items():
            print(f"{key}: {old} -> {new}")
        cfg = run.load_config()
        preflight(cfg, remaining_stages(run, cfg))  # the URL list and models of the stages still to run
        run.log_event("resumed")
        return _run_flow(run.root, run.run_id, "lvd resume")


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import serve

    serve(args.config, args.overrides, args.name, args.cron, args.interval, args.concurrency)  # until Ctrl-C
    return 0


def cmd_retry_failed(args: argparse.Namespace) -> int:
    from flows import interrupt
    from flows.cluster import cluster_problems
    from flows.retry import retry_failed_flow
    from infra import reaper
    from infra.prefect_db import ensure_embedded_database
    from infra.runs import open_run

    run, cfg = open_run(args.root, args.run_id)
    if problems := cluster_problems(cfg, run.path, {"ingest"}):  # its shards download again on the cluster
        raise ConfigError(problems, "the run's cluster", "cannot be used")
    ensure_embedded_database()
    run_dir, again = run.path, f"lvd retry-failed {args.run_id} --root {args.root}"
    with run_lock.writing(run_dir, "lvd retry-failed"), interrupt.for_run(args.root, args.run_id), \
            reaper.watching(run_dir, "lvd retry-failed", again):
        state = retry_failed_flow(str(args.root), args.run_id, args.reason or None, return_state=True)
    watchdog = ExitWatchdog(None, _exit_timeout(), again)
    watchdog.arm("the retry flow returned", 0 if state.is_completed() else 1)
    watchdog.start()
    try:
        return _report_retry(args, state)
    finally:
        _flush_prefect()
        watchdog.finished.set()


def _report_retry(args: argparse.Namespace, state: Any) -> int:
    if not state.is_completed():
        print(f"retry of run {args.run_id} failed: {state.message}", file=sys.stderr)
        return 1
    out = state.result()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(out["by_reason"].items())) or "none"
        print(f"attempt {out['attempt']}: retried {out['retried']} rows ({reasons}), recovered {out['recovered']} "
              f"into {len(out['shards'])} new shards")  # fmt: skip
        from flows.interrupt import resume_command

        print(f"later stages are now stale: {resume_command(args.root, args.run_id)}")
    return 0



def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="run a configuration (completed stages are reused)")
    r.add_argument("config", type=Path)
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    r.add_argument("--dry-run", action="store_true", help="say what each stage would do (reused, linked, resumed, "
                                                          "computed, and why) and stop")
    r.set_defaults(fn=cmd_run, starts_flow=True)
    c = sub.add_parser("resume", help="continue a run from where it stopped")
    c.add_argument("run_id")
    c.add_argument("overrides", nargs="*", help="how the run executes from here, e.g. run.shard_retries=2 "
                                                "run.task_runner=dask train.devices=4 "
                                                "train.accumulate_grad_batches=2 (nothing else)")
    c.add_argument("--root", default="runs", help="folder that holds the runs (default: runs)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--dry-run", action="store_true", help="say what each stage would do and stop")
    c.set_defaults(fn=cmd_resume, starts_flow=True)
    sv = sub.add_parser("serve", help="serve `lvd run CONFIG` as a Prefect deployment (schedules, runs from the UI)")
    sv.add_argument("config", type=Path)
    sv.add_argument("overrides", nargs="*", help="dotted overrides, as for lvd run")
    sv.add_argument("--name", default=None, help="the deployment's name (default: the configuration file's stem)")
    when = sv.add_mutually_exclusive_group()
    when.add_argument("--cron", default=None, help='a schedule, e.g. "0 3 * * *" (none: runs start from the UI)')
    when.add_argument("--interval", type=float, default=None, help="a schedule every this many seconds")
    sv.add_argument("--concurrency", type=int, default=1,
                    help="runs of the deployment at once (default 1: a run that starts while one works waits for it)")
    sv.set_defaults(fn=cmd_serve)
    rf = sub.add_parser("retry-failed", help="re-download only the failed URLs of a finished ingest (new shards)")
    rf.add_argument("run_id")
    rf.add_argument("--reason", action="append", metavar="R",
                    help="retry rows that failed for this reason (repeatable, shell patterns: http_5*); "
                         "default: transient failures (timeouts, 429, 5xx, connection and DNS errors)")  # fmt: skip
    rf.add_argument("--root", default="runs", help="folder that holds the runs (default: runs)")
    rf.add_argument("--json", action="store_true", help="machine-readable output")
    rf.set_defaults(fn=cmd_retry_failed, starts_flow=True)
