"""Commands that read runs: `lvd runs`, `status`, `lineage`, `audit`, `domains`, `report`, and `folder-urls` (a pool's
list)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_status(args: argparse.Namespace) -> int:
    from flows.resume_points import stage_progress  # not flows.stages: no stage cores, no torch
    from infra.runs import open_run
    from infra.summary import format_summary, run_summary

    run, cfg = open_run(args.root, args.run_id)
    summary = run_summary(run, cfg, progress=stage_progress)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from infra.run_index import format_runs, list_runs

    rows = list_runs(args.root)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_runs(rows))
    else:
        print(f"no runs under {args.root} (start one with: lvd run CONFIG)", file=sys.stderr)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from infra.lineage_lookup import AmbiguousId, find_chain
    from infra.lineage_view import describe_chain

    run_dir = Path(args.root) / args.run_id
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run {args.run_id!r} under {args.root}")
    try:
        chain, key = find_chain(run_dir, args.key)
    except AmbiguousId as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not chain:
        print(f"no lineage for {args.key!r} in run {args.run_id}", file=sys.stderr)
        return 1
    print(json.dumps(chain, indent=2) if args.json else describe_chain(chain, key))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from infra.audit import audit_run
    from infra.runs import open_run

    run, cfg = open_run(args.root, args.run_id)
    report = audit_run(run, cfg)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def cmd_domains(args: argparse.Namespace) -> int:
    from infra.domains import domains, format_domains
    from infra.runs import open_run

    run, cfg = open_run(args.root, args.run_id)
    frame = domains(run.path, local=bool(cfg.ingest.local_roots))
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
    from curation.urls import FolderListError, folder_url_list
    from infra.images import UNDECODABLE_SUFFIXES

    try:
        listing = folder_url_list(Path(args.folder), Path(args.out), all_files=args.all_files, fresh=args.fresh)
    except (FolderListError, FileNotFoundError) as err:
        print(f"lvd folder-urls: {err}", file=sys.stderr)
        return 2
    if listing.kept:  # an update of a list written before
        added = listing.listed - listing.kept
        if added:
            print(f"{args.out} updated: its {listing.kept:,} rows kept as they were, {added:,} new files added after "
                  f"them (rows {listing.kept:,}-{listing.listed - 1:,})")
        else:
            print(f"{args.out} unchanged: it lists every file of the folder already ({listing.kept:,} rows)")
        if listing.missing:
            print(f"{listing.missing:,} listed files are no longer in the folder: their rows stay, and ingest records "
                  "them as file_missing (--fresh writes the list anew, every row renumbered)")
    else:
        print(f"{listing.listed:,} files listed in {args.out}")
    if listing.skipped:
        print(f"{listing.skipped:,} files left out for their suffix ({_suffixes(listing.skipped_suffixes)}; e.g. "
              f"{', '.join(listing.skipped_examples)}); --all-files lists them too, each then recorded with its reason "
              "at ingest")
        raw = sorted(s for s, _ in listing.skipped_suffixes if s in UNDECODABLE_SUFFIXES)
        if raw:
            print(f"  {', '.join(raw)}: image files this project cannot decode (camera raw, vector, layered, JPEG XL): "
                  "convert them to JPEG, PNG or TIFF to curate them")
    if listing.hidden:
        print(f"{listing.hidden:,} hidden files left out (names starting with '.', such as macOS's ._IMG_0001.jpg "
              "resource forks and .DS_Store, and everything in hidden folders and Synology's @eaDir thumbnails)")
    root = Path(args.folder).resolve()
    print(f'use it with: lvd run configs/own_folder.yaml data.url_list={args.out} "ingest.local_roots=[{root}]"')
    return 0 if listing.listed else 1


def _suffixes(counts: tuple[tuple[str, int], ...], top: int = 6) -> str:
    shown = ", ".join(f"{suffix} {n:,}" for suffix, n in counts[:top])
    return shown + (f", {len(counts) - top} more suffixes" if len(counts) > top else "")


def cmd_report(args: argparse.Namespace) -> int:
    from evaluation.report import build_report
    from flows.pipeline import face_blur
    from infra.runs import open_run

    run_dir = Path(args.root) / args.run_id
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"no run {args.run_id!r} under {args.root}")
    _, cfg = open_run(args.root, args.run_id)
    path = build_report(run_dir, Path(args.out) if args.out else None, blur=face_blur(cfg))
    print(f"report: {path}")
    if args.screenshot:
        from evaluation.report.browser import render

        shot = render(path, Path(args.screenshot))
        print(f"screenshot: {shot.screenshot}" + (f" ({len(shot.console_errors)} console errors)" if shot.console_errors else ""))
    return 0



def register(sub: argparse._SubParsersAction) -> None:
    for name, fn, helptext in (
        ("status", cmd_status, "stages, counts and state of a run"),
        ("lineage", cmd_lineage, "every decision about an image id or a URL"),
        ("audit", cmd_audit, "re-hash the corpus and check the ledger and manifests (exit 1 on any discrepancy)"),
        ("domains", cmd_domains, "per host: URLs, downloads, failure reasons and images in the corpus"),
    ):
        c = sub.add_parser(name, help=helptext)
        if name == "status":
            c.add_argument("run_id", nargs="?", help="a run id or a prefix of one (default: the latest run)")
        else:
            c.add_argument("run_id", help="a run id or a prefix of one")
        if name == "lineage":
            c.add_argument("key", help="an image id or a unique prefix of one (4+ hex digits, as printed), a URL, "
                                       "or row:N (row N of the URL list)")
        if name == "domains":
            c.add_argument("--top", type=int, default=30, help="hosts to list, most URLs first (0: all)")
            c.add_argument("--csv", default=None, help="also write every host to this CSV file")
        c.add_argument("--root", default="runs", help="folder that holds the runs (default: runs)")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.set_defaults(fn=fn)
    runs = sub.add_parser("runs", help="the runs under --root: id, created, state, corpus size, headline kNN")
    runs.add_argument("--root", default="runs", help="folder that holds the runs (default: runs)")
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    runs.set_defaults(fn=cmd_runs)
    fu = sub.add_parser("folder-urls", help="a URL list of file:// URLs for a folder of images (a local pool)")
    fu.add_argument("folder", type=Path)
    fu.add_argument("out", type=Path, help="the URL list to write (.parquet)")
    fu.add_argument("--all-files", action="store_true", help="list every file, not only image suffixes")
    fu.add_argument("--fresh", action="store_true",
                    help="write the list anew in sorted order (default for an existing list: keep its rows and add "
                         "new files after them, so a run of it computes only what is new)")
    fu.set_defaults(fn=cmd_folder_urls)
    rep = sub.add_parser("report", help="(re)write the run's self-contained HTML report")
    rep.add_argument("run_id")
    rep.add_argument("--root", default="runs", help="folder that holds the runs (default: runs)")
    rep.add_argument("--out", default=None, help="where to write it (default: <run>/report.html)")
    rep.add_argument("--screenshot", default=None, help="also render it in headless chromium to this PNG")
    rep.set_defaults(fn=cmd_report)
