"""The runs under a root: listing them (`lvd runs`), the latest one (`lvd status` without an id), and short ids.

A run is a folder of the root holding `config.yaml`: a pipeline run (with `run.json` and `events.jsonl`) or an
`lvd evaluate` evaluation (`eval-...`, with its results). Wherever a command takes a run id, a prefix of one is
enough when it names a single run; an ambiguous prefix is refused with its candidates.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from infra.history import attempts, describe
from infra.manifest import read_manifest
from infra.run import CONFIG_FILE, RunDir
from infra.run_lock import holder
from infra.storage import read_json

RUN_INFO = "run.json"  # (infra.runs.RUN_INFO: written when a run is made)
HEADLINE = "knn_top1_k20"  # the number `lvd status` and the report lead with


class RunIdError(LookupError):
    """No run, or more than one (`candidates`), answers to the id a command was given."""

    def __init__(self, message: str, candidates: list[str] | None = None):
        super().__init__(message)
        self.candidates = candidates or []


def run_ids(root: Path | str, pipeline_only: bool = False) -> list[str]:
    """The runs (and evaluations, unless `pipeline_only`) under `root`, by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()]
    if pipeline_only:
        found = [p for p in found if (p / RUN_INFO).is_file() or (p / "events.jsonl").is_file()]
    return sorted(p.name for p in found)


def resolve_run_id(root: Path | str, text: str) -> str:
    """`text` itself when it names a folder under `root` (a run, or what is left of one: `lvd lineage` needs only its
    ledger), else the one run whose id starts with it. A run's folder given as a path (`runs/demo-1a2b3c4d/`, as the
    shell completes it) names that run when it lies under `root`; elsewhere the error says which --root to give."""
    if text and (Path(root) / text).is_dir():
        return text
    if text and ("/" in text or text.startswith(".")) and Path(text).is_dir():
        folder = Path(text).resolve()
        if folder.parent == Path(root).resolve():
            return folder.name
        if (folder / CONFIG_FILE).is_file():
            raise RunIdError(f"{text} is a run under {folder.parent}, not under {root}: give --root {folder.parent} "
                             f"{folder.name}")  # fmt: skip
    matches = [r for r in run_ids(root) if r.startswith(text)] if text else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = run_ids(root)
        listed = f" (runs: {', '.join(known[:20])}{', ...' if len(known) > 20 else ''})" if known else " (none yet)"
        raise RunIdError(f"no run {text!r} under {root}{listed}")
    raise RunIdError(f"{text!r} names {len(matches)} runs under {root}: {', '.join(matches)}; give more of the id",
                     matches)


def created(run_dir: Path) -> str:
    """When the run was made (`run.json`), else its config's modification time; ISO 8601, UTC."""
    info = run_dir / RUN_INFO
    if info.is_file():
        stamp = read_json(info).get("created")
        if stamp:
            return str(stamp)
    mtime = (run_dir / CONFIG_FILE).stat().st_mtime
    return dt.datetime.fromtimestamp(mtime, dt.UTC).isoformat(timespec="milliseconds")


def latest_run(root: Path | str) -> str:
    """The pipeline run made last under `root`."""
    ids = run_ids(root, pipeline_only=True)
    if not ids:
        raise RunIdError(f"no run under {root} yet: start one with `lvd run CONFIG`, or name its folder with --root")
    return max(ids, key=lambda r: (created(Path(root) / r), r))


def state(run: RunDir) -> str:
    """How the last attempt that ran its flow (`lvd run`, `lvd resume`; not `lvd retry-failed`) ended, in words:
    `completed`, `failed in dedup`, `running in pretrain: lvd resume, pid ...`, ..."""
    history = attempts(run)
    rows = [row for row, a in zip(describe(history, holder(run.path)), history, strict=True)
            if a.by != "lvd retry-failed"]
    return rows[-1]["ended"] if rows else "not started"


def headline(run: RunDir) -> tuple[str, float] | None:
    """(benchmark, value): the pretrained (or first) model's 20-NN top-1 on the first classification benchmark."""
    path = run.stage_dir("evaluate") / "metrics.json"
    if not path.is_file():
        return None
    for benchmark, models in read_json(path).items():
        values = {m: v[HEADLINE] for m, v in models.items() if HEADLINE in v}
        if values:
            return benchmark, values.get("pretrained", next(iter(values.values())))
    return None


def list_runs(root: Path | str) -> list[dict[str, Any]]:
    """One row per pipeline run, oldest first: id, created, state, corpus size, headline kNN."""
    rows = []
    for run_id in run_ids(root, pipeline_only=True):
        run = RunDir(Path(root), run_id)
        corpus = read_manifest(run.stage_dir("corpus"))
        knn = headline(run)
        rows.append({"run_id": run_id, "created": created(run.path), "state": state(run),
                     "corpus": corpus.counts.get("kept") if corpus else None,
                     "knn": None if knn is None else {"benchmark": knn[0], "top1_k20": knn[1]}})
    return sorted(rows, key=lambda r: (r["created"], r["run_id"]))


def format_runs(rows: list[dict[str, Any]]) -> str:
    table = [["run", "created (UTC)", "state", "corpus", "kNN top-1 (20-NN)"]]
    for r in rows:
        knn = r["knn"]
        table.append([r["run_id"], r["created"][:16].replace("T", " "), r["state"],
                      "" if r["corpus"] is None else f"{r['corpus']:,}",
                      "" if knn is None else f"{knn['top1_k20']:.1f} % ({knn['benchmark']})"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                   strict=True))).rstrip()
                     for row in table)
