"""``lvd``: run, resume, inspect and audit curate-then-train runs.

    lvd run CONFIG [key.path=value ...]     run (or re-run: completed stages are reused; --dry-run: say what
                                            each stage would do, and why, and stop)
    lvd resume RUN_ID [run.key=value ...]   continue a run from where it stopped (how it executes may change)
    lvd runs                                the runs under --root: id, created, state, corpus size, headline kNN
    lvd status [RUN_ID]                     stages, counts, state (default: the latest run)
    lvd lineage RUN_ID KEY                  every decision about an image (id or prefix), row (row:N) or URL
    lvd report RUN_ID                       (re)write the run's self-contained HTML report
    lvd evaluate (CONFIG | RUN_ID) --model NAME=CHECKPOINT ...
                                            checkpoints side by side on a configuration's benchmarks
    lvd compare RUN_A RUN_B                 evaluation results of two runs (or evaluations) side by side
    lvd export RUN_ID --format F DEST       the run's model for transformers (hf), timm, torch (pth), safetensors, onnx
    lvd retry-failed RUN_ID [--reason R]    re-download only the failed URLs of a finished ingest
    lvd models fetch NAME [NAME ...]        download official model files (SSCD, DINOv2) with checksums

A run id may be shortened to any prefix that names one run (`lvd status tiny`); dotted overrides (key=value) may come
before or after the options. Progress and log lines go to stderr (a live display on a terminal, plain lines
otherwise: LVD_PROGRESS_INTERVAL seconds apart, 30 by default); results go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from flows import interrupt
from flows.cli import export, models, records, running
from infra.config import ConfigError
from infra.cpus import limit_native_threads
from infra.run_index import RunIdError, latest_run, resolve_run_id
from infra.run_lock import BUSY_EXIT, RunBusy


def _quiet() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # Prefect's own INFO lines (task runs created, states) go to the flow run's logs, not to the console
    # (infra.console.setup_console).
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The embedded server's start (20 s by default) can take longer on a machine busy with the flow's own workers.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    running.register(sub)
    records.register(sub)
    models.register(sub)
    export.register(sub)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Each command's arguments in any order (`lvd evaluate RUN --model X key=value`): argparse's intermixed parsing,
    which refuses parsers with sub-commands, applied from the innermost command down."""
    sub = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return p.parse_intermixed_args(argv)
    if not argv or argv[0] not in sub.choices:
        return p.parse_args(argv)  # help, or argparse's own error naming the choices
    args = parse(sub.choices[argv[0]], argv[1:])
    setattr(args, sub.dest, argv[0])
    return args


def resolve_ids(args: argparse.Namespace) -> None:
    """Whole run ids for the prefixes given; `lvd status` alone: the latest run."""
    root = getattr(args, "root", "runs")
    for attr in ("run_id", "run_a", "run_b"):
        if getattr(args, attr, None):
            setattr(args, attr, resolve_run_id(root, getattr(args, attr)))
    if getattr(args, "command", None) == "status" and not args.run_id:
        args.run_id = latest_run(root)
    if getattr(args, "command", None) == "export" and not Path(args.source).expanduser().exists():
        with contextlib.suppress(RunIdError):  # (not a run either: cmd_export says so, naming both)
            args.source = resolve_run_id(root, args.source)
    if getattr(args, "command", None) == "evaluate" and not Path(args.source).is_file():
        try:
            args.source = resolve_run_id(root, args.source)
        except RunIdError as err:
            if err.candidates:  # ambiguous: say so
                raise
            raise FileNotFoundError(f"{args.source} is neither a configuration file nor a run under {root}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse(parser(), sys.argv[1:] if argv is None else list(argv))
    _quiet()
    from infra.console import setup_console

    setup_console()
    starts_flow = getattr(args, "starts_flow", False)
    # Before torch, FAISS or numpy load: their thread pools sized to the CPUs this process may use (a container's
    # quota included, which none of them reads).
    limit_native_threads()
    if starts_flow:
        running.check_environment()
    try:
        resolve_ids(args)
        # Ctrl-C before the run's flow starts (loading the configuration, Prefect's database): a clean stop too.
        with interrupt.handled() if starts_flow else contextlib.nullcontext():
            return int(args.fn(args))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except (FileNotFoundError, RunIdError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunBusy as err:  # another process writes the run: nothing was written (infra.run_lock)
        print(f"error: {err}", file=sys.stderr)
        return BUSY_EXIT
    except BrokenPipeError:  # `lvd lineage ... | head`: the reader has what it wanted; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 141  # what a shell reports for a command its pipe's reader stopped (128 + SIGPIPE)
