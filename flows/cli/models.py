"""Model commands: `lvd evaluate` (checkpoints side by side), `lvd compare`, `lvd models fetch`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_evaluate(args: argparse.Namespace) -> int:
    from evaluation.results import RESULTS, format_results
    from flows.evaluate import evaluate_checkpoints, parse_model_spec
    from infra import reaper
    from infra.config import load_config

    run_config = Path(args.root) / args.source / "config.yaml"
    # A run id: its resolved configuration declares the benchmarks (the demo's are filled in when a run is made).
    cfg = load_config(run_config if run_config.is_file() else Path(args.source), args.overrides)
    entries = [parse_model_spec(s) for s in args.model]
    with reaper.watching(None, "lvd evaluate"):  # (stops what is left if this process is killed)
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



def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="evaluate checkpoints on the benchmarks of a configuration or a run")
    ev.add_argument("source", help="a pipeline YAML, or a run id whose resolved config declares the benchmarks")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluate.linear.iterations=1000")
    ev.add_argument("--model", action="append", required=True,
                    metavar="NAME=PATH[,kind=..,arch=..,image_size=..,interpolate_offset=..,interpolate_antialias=..]",
                    help="a checkpoint: project .safetensors, official DINOv2 .pth (released or training), transformers "
                         "folder, timm DINOv2 file, DINOv3 (Meta's .pth, transformers or timm), or kind=timm,arch=NAME "
                         "(repeat)")
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
    models = sub.add_parser("models", help="official model files").add_subparsers(dest="models_command", required=True)
    f = models.add_parser("fetch", help="download official model files (needs internet) and check their sha256")
    f.add_argument("names", nargs="*", help="registry names, e.g. sscd_disc_mixup dinov2_vits14")
    f.add_argument("--dir", default="models", help="destination folder (default: models)")
    f.add_argument("--list", action="store_true", help="list the registry")
    f.set_defaults(fn=cmd_models_fetch)
