"""``lvd``: run, resume, inspect and audit curate-then-train runs.

    lvd run CONFIG [key.path=value ...]     run (or re-run: completed stages are reused)
    lvd resume RUN_ID [run.key=value ...]   continue a run from where it stopped (how it executes may change)
    lvd status RUN_ID                       stages, counts, state
    lvd lineage RUN_ID (IMAGE_ID | URL)     every decision about an image or URL (--json)
    lvd report RUN_ID                       (re)write the run's self-contained HTML report
    lvd evaluate (CONFIG | RUN_ID) --model NAME=CHECKPOINT ...
                                            checkpoints side by side on a configuration's benchmarks
    lvd compare RUN_A RUN_B                 evaluation results of two runs (or evaluations) side by side
    lvd retry-failed RUN_ID [--reason R]    re-download only the failed URLs of a finished ingest
    lvd models fetch NAME [NAME ...]        download official model files (SSCD, DINOv2) with checksums
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from infra.config import ConfigError

# Seconds Prefect gets, once a flow's own work has ended, to record it at its API before the process exits anyway
# (see ExitWatchdog).
TIMEOUT_ENV = "LVD_PREFECT_EXIT_TIMEOUT"
TIMEOUT_DEFAULT = 60.0


def _check_environment() -> None:
    """The `dataclasses` backport (pulled by img2dataset) breaks Prefect's API server; refuse early."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("dataclasses")
    except PackageNotFoundError:
        return
    raise SystemExit("the `dataclasses` backport is installed and breaks Prefect's server: pip uninstall -y dataclasses")


def _quiet() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The embedded server's start (20 s by default) can take longer on a machine busy with the flow's own workers.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _api_url() -> str:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or "(the embedded server)"


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


def _run_flow(run_root: Path, run_id: str) -> int:
    import httpx

    from flows.pipeline import pipeline
    from infra.prefect_db import ensure_embedded_database
    from infra.runs import open_run
    from infra.summary import format_summary, run_summary

    run, _ = open_run(run_root, run_id)
    resume = f"lvd resume {run_id} --root {run_root}"
    ensure_embedded_database()  # a server start killed mid-migration must not break every later resume
    watchdog = ExitWatchdog(run.events_path, _exit_timeout(), resume)
    watchdog.start()
    try:
        try:
            state = pipeline(str(run_root), run_id, return_state=True)
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


def cmd_run(args: argparse.Namespace) -> int:
    from infra.runs import prepare_run

    run, _ = prepare_run(args.config, args.overrides)
    print(f"run {run.run_id} in {run.path}")
    return _run_flow(run.root, run.run_id)


def cmd_resume(args: argparse.Namespace) -> int:
    from infra.runs import amend_run, open_run

    run, _ = open_run(args.root, args.run_id)
    for key, (old, new) in amend_run(run, args.overrides).items():
        print(f"{key}: {old} -> {new}")
    run.log_event("resumed")
    return _run_flow(run.root, run.run_id)


def cmd_status(args: argparse.Namespace) -> int:
    from flows.stages import stage_progress
    from infra.runs import open_run
    from infra.summary import format_summary, run_summary

    run, cfg = open_run(args.root, args.run_id)
    summary = run_summary(run, cfg, progress=stage_progress)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from infra.lineage import Ledger
    from infra.lineage_view import describe_chain

    ledger = Ledger(Path(args.root) / args.run_id)
    key = args.key
    is_image = len(key) == 64 and all(c in "0123456789abcdef" for c in key.lower())
    chain = ledger.chain(image_id=key.lower()) if is_image else ledger.chain(url=key)
    if chain.empty:
        print(f"no lineage for {key!r} in run {args.run_id}", file=sys.stderr)
        return 1
    print(chain.to_json(orient="records", indent=2) if args.json else describe_chain(chain, key))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from infra.audit import audit_run
    from infra.runs import open_run

    run, _ = open_run(args.root, args.run_id)
    report = audit_run(run)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def cmd_domains(args: argparse.Namespace) -> int:
    from infra.domains import domain_stats, format_domains
    from infra.runs import open_run

    run, _ = open_run(args.root, args.run_id)
    frame = domain_stats(run.path)
    if frame.empty:
        print(f"run {args.run_id} has no ingest ledger yet", file=sys.stderr)
        return 1
    if args.csv:
        out = frame.assign(failures=[json.dumps(f) for f in frame["failures"]])
        out.to_csv(args.csv, index=False)
        print(f"{len(frame):,} hosts written to {args.csv}", file=sys.stderr)
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")  # a rate of nothing requested: null
    print(json.dumps(records, indent=2) if args.json else format_domains(frame, args.top or None))
    return 0


def cmd_folder_urls(args: argparse.Namespace) -> int:
    from curation.urls import folder_url_list

    listing = folder_url_list(Path(args.folder), Path(args.out), all_files=args.all_files)
    print(f"{listing.listed:,} files listed in {args.out}")
    if listing.skipped:
        print(f"{listing.skipped:,} files left out for their suffix (e.g. {', '.join(listing.skipped_examples)}); "
              "--all-files lists them too, each then recorded with its reason at ingest")
    root = Path(args.folder).resolve()
    print(f'use it with: data.url_list={args.out} "ingest.local_roots=[{root}]"')
    return 0 if listing.listed else 1


def cmd_report(args: argparse.Namespace) -> int:
    from evaluation.report import build_report

    run_dir = Path(args.root) / args.run_id
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"no run {args.run_id!r} under {args.root}")
    path = build_report(run_dir, Path(args.out) if args.out else None)
    print(f"report: {path}")
    if args.screenshot:
        from evaluation.report.browser import render

        shot = render(path, Path(args.screenshot))
        print(f"screenshot: {shot.screenshot}" + (f" ({len(shot.console_errors)} console errors)" if shot.console_errors else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from evaluation.results import RESULTS, format_results
    from flows.evaluate import evaluate_checkpoints, parse_model_spec
    from infra.config import load_config

    run_config = Path(args.root) / args.source / "config.yaml"
    # A run id: its resolved configuration declares the benchmarks (the demo's are filled in when a run is made).
    cfg = load_config(run_config if run_config.is_file() else Path(args.source), args.overrides)
    entries = [parse_model_spec(s) for s in args.model]
    out, _ = evaluate_checkpoints(cfg, entries, Path(args.root), args.name, args.random_init, args.raw_pixels)
    import pandas as pd

    print(format_results(pd.read_parquet(out / RESULTS)))
    print(f"\nresults: {out}  (lvd compare {out.name} OTHER --root {args.root})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from evaluation.results import compare, format_compare, run_results

    a, b = run_results(args.root, args.run_a), run_results(args.root, args.run_b)
    merged = compare(a, b)
    if args.json:
        print(merged.to_json(orient="records", indent=2))
    else:
        print(format_compare(merged, args.run_a, args.run_b))
    return 0


def cmd_retry_failed(args: argparse.Namespace) -> int:
    from flows.retry import retry_failed_flow
    from infra.prefect_db import ensure_embedded_database

    ensure_embedded_database()
    state = retry_failed_flow(str(args.root), args.run_id, args.reason or None, return_state=True)
    watchdog = ExitWatchdog(None, _exit_timeout(), f"lvd retry-failed {args.run_id} --root {args.root}")
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
        print(f"later stages are now stale: lvd resume {args.run_id} --root {args.root}")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from curation.models.registry import REGISTRY, ChecksumError, fetch

    if args.list:
        for entry in REGISTRY.values():
            print(f"{entry.name:<36} {'pinned' if entry.sha256 else 'unpinned':<9} {entry.url}")
        return 0
    if not args.names:
        print("name at least one model (see --list)", file=sys.stderr)
        return 2
    for name in args.names:
        try:
            path, digest, verified = fetch(name, Path(args.dir))
        except (KeyError, ChecksumError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        state = "verified" if verified else f"recorded in {Path(args.dir) / 'checksums.json'} (no upstream checksum)"
        print(f"{path}  sha256={digest}  {state}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a configuration (completed stages are reused)")
    r.add_argument("config", type=Path)
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    r.set_defaults(fn=cmd_run)
    for name, fn, helptext in (
        ("resume", cmd_resume, "continue a run from where it stopped"),
        ("status", cmd_status, "stages, counts and state of a run"),
        ("lineage", cmd_lineage, "every decision about an image id or a URL"),
        ("audit", cmd_audit, "re-hash the corpus and check the ledger and manifests (exit 1 on any discrepancy)"),
        ("domains", cmd_domains, "per host: URLs, downloads, failure reasons and images in the corpus"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("run_id")
        if name == "lineage":
            c.add_argument("key", help="an image id (sha256) or a URL")
        if name == "resume":
            c.add_argument("overrides", nargs="*", help="how the run executes from here, e.g. run.shard_retries=2 "
                                                        "run.task_runner=dask train.devices=4 "
                                                        "train.accumulate_grad_batches=2 (nothing else)")
        if name == "domains":
            c.add_argument("--top", type=int, default=30, help="hosts to list, most URLs first (0: all)")
            c.add_argument("--csv", default=None, help="also write every host to this CSV file")
        c.add_argument("--root", default="runs", help="folder that holds the runs (default: runs)")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.set_defaults(fn=fn)
    fu = sub.add_parser("folder-urls", help="a URL list of file:// URLs for a folder of images (a local pool)")
    fu.add_argument("folder", type=Path)
    fu.add_argument("out", type=Path, help="the URL list to write (.parquet)")
    fu.add_argument("--all-files", action="store_true", help="list every file, not only image suffixes")
    fu.set_defaults(fn=cmd_folder_urls)
    rep = sub.add_parser("report", help="(re)write the run's self-contained HTML report")
    rep.add_argument("run_id")
    rep.add_argument("--root", default="runs", help="folder that holds the runs (default: runs)")
    rep.add_argument("--out", default=None, help="where to write it (default: <run>/report.html)")
    rep.add_argument("--screenshot", default=None, help="also render it in headless chromium to this PNG")
    rep.set_defaults(fn=cmd_report)
    ev = sub.add_parser("evaluate", help="evaluate checkpoints on the benchmarks of a configuration or a run")
    ev.add_argument("source", help="a pipeline YAML, or a run id whose resolved config declares the benchmarks")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluate.linear.iterations=1000")
    ev.add_argument("--model", action="append", required=True, metavar="NAME=PATH[,kind=..,arch=..,image_size=..]",
                    help="a checkpoint: project .safetensors, official DINOv2 .pth, or kind=timm,arch=NAME (repeat)")
    ev.add_argument("--random-init", action="store_true", help="add the first model's architecture, untrained")
    ev.add_argument("--raw-pixels", action="store_true", help="add the raw-pixel baseline")
    ev.add_argument("--name", default=None, help="evaluation id (default: eval-<hash of config and models>)")
    ev.add_argument("--root", default="runs", help="where results go and runs are found (default: runs)")
    ev.set_defaults(fn=cmd_evaluate)
    cmp_ = sub.add_parser("compare", help="evaluation results of two runs or evaluations side by side")
    cmp_.add_argument("run_a")
    cmp_.add_argument("run_b")
    cmp_.add_argument("--root", default="runs", help="folder that holds the runs (default: runs)")
    cmp_.add_argument("--json", action="store_true", help="machine-readable output")
    cmp_.set_defaults(fn=cmd_compare)
    rf = sub.add_parser("retry-failed", help="re-download only the failed URLs of a finished ingest (new shards)")
    rf.add_argument("run_id")
    rf.add_argument("--reason", action="append", metavar="R",
                    help="retry rows that failed for this reason (repeatable, shell patterns: http_5*); "
                         "default: transient failures (timeouts, 429, 5xx, connection and DNS errors)")  # fmt: skip
    rf.add_argument("--root", default="runs", help="folder that holds the runs (default: runs)")
    rf.add_argument("--json", action="store_true", help="machine-readable output")
    rf.set_defaults(fn=cmd_retry_failed)
    models = sub.add_parser("models", help="official model files").add_subparsers(dest="models_command", required=True)
    f = models.add_parser("fetch", help="download official model files (needs internet) and check their sha256")
    f.add_argument("names", nargs="*", help="registry names, e.g. sscd_disc_mixup dinov2_vits14")
    f.add_argument("--dir", default="models", help="destination folder (default: models)")
    f.add_argument("--list", action="store_true", help="list the registry")
    f.set_defaults(fn=cmd_models_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _quiet()
    if args.command in ("run", "resume", "retry-failed"):
        _check_environment()
    try:
        return int(args.fn(args))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
