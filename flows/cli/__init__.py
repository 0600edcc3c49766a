"""``lvd``: run, resume, inspect and audit curate-then-train runs.

    lvd run CONFIG [key.path=value ...]     run (or re-run: completed stages are reused)
    lvd resume RUN_ID [run.key=value ...]   continue a run from where it stopped (how it executes may change)
    lvd status RUN_ID                       stages, counts, state
    lvd lineage RUN_ID (IMAGE_ID | URL)     every decision about an image or URL (--json)
    lvd report RUN_ID                       (re)write the run's self-contained HTML report
    lvd evaluate (CONFIG | RUN_ID) --model NAME=CHECKPOINT ...
                                            checkpoints side by side on a configuration's benchmarks
    lvd compare RUN_A RUN_B                 evaluation results of two runs (or evaluations) side by side
    lvd export RUN_ID --format F DEST       the run's model for transformers (hf), timm, torch (pth) or safetensors
    lvd retry-failed RUN_ID [--reason R]    re-download only the failed URLs of a finished ingest
    lvd models fetch NAME [NAME ...]        download official model files (SSCD, DINOv2) with checksums
"""

from __future__ import annotations

import argparse
import os
import sys

from flows.cli import export, models, records, running
from infra.config import ConfigError


def _quiet() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _quiet()
    if getattr(args, "starts_flow", False):
        running.check_environment()
    try:
        return int(args.fn(args))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
