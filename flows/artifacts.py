"""What a run shows in the Prefect UI beside its task runs and logs: each stage's result as a markdown artifact of its
task run (what it kept and dropped and why, how long it took, its peak memory, or the run it was taken from), and the
run's summary (the `lvd status` table, the corpus, kNN, the report) as an artifact of the flow run, keyed by the run
(`lvd-<run id>`: one version per attempt, listed under Artifacts). The run directory stays the record; these are its
view in Prefect, written where the Prefect API answers (a failure to write one is a warning, never a failed run)."""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any

from infra.manifest import StageManifest
from infra.memory import gib
from infra.run import RunDir
from infra.summary import row_note

log = logging.getLogger("lvd")


def prefect_name(run_id: str) -> str:
    """`lvd-<run id>` in the characters Prefect allows in block names and artifact keys (lowercase, digits, dashes)."""
    return "lvd-" + re.sub(r"[^a-z0-9-]", "-", run_id.lower())


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in sorted(value.items()) if v != 0) or "none"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def count_rows(counts: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) per count, kept and dropped first; dropped as its total and its reasons."""
    order = sorted(counts, key=lambda k: (k != "kept", k != "dropped"))
    rows = []
    for k in order:
        v = counts[k]
        if k == "dropped" and isinstance(v, dict):
            total = sum(n for n in v.values() if isinstance(n, int))
            rows.append((k, f"{total:,}" + (f" ({_cell(v)})" if total else "")))
        else:
            rows.append((k, _cell(v)))
    return rows


def stage_markdown(run: RunDir, manifest: StageManifest) -> str:
    """The stage's result as its task run's artifact shows it."""
    stage = manifest.stage
    last = next((e for e in reversed(run.events()) if e.get("stage") == stage and e.get("event") in ("completed",
                                                                                                      "skipped")), {})
    if last.get("event") == "completed":
        took = datetime.fromisoformat(manifest.finished_at) - datetime.fromisoformat(manifest.started_at)
        how = f"computed in {str(took).split('.')[0]}" + (f", peak memory {gib(last['peak_memory'])}"
                                                          if last.get("peak_memory") else "")  # fmt: skip
    elif last.get("from_run"):
        how = f"taken from run `{last['from_run']}` (the same inputs and configuration; its files linked)"
    else:
        how = "complete already (the same inputs and configuration)"
    rows = [*count_rows(manifest.counts), ("output files", _cell(len(manifest.outputs)))]
    lines = [f"**{stage}** of run `{run.run_id}`: {how}.", "", "| count | value |", "|---|---|",
             *(f"| {k} | {v} |" for k, v in rows), "",
             f"Every decision about an image: `lvd lineage {run.run_id} IMAGE_ID` (or `row:N`, or its URL)."]
    return "\n".join(lines)


def summary_markdown(s: dict[str, Any]) -> str:
    """`infra.summary.run_summary` as the flow run's artifact shows it."""
    lines = [f"Run `{s['run_id']}` (`{s['path']}`)", "", "| stage | state | kept | dropped | reasons |",
             "|---|---|---:|---:|---|"]
    for r in s["stages"]:
        kept = "" if r["kept"] is None else f"{r['kept']:,}"
        lines.append(f"| {r['stage']} | {r['state']} | {kept} | {r['dropped']:,} | {row_note(r)} |")
    if "corpus_size" in s:
        lines += ["", f"Corpus: {s['corpus_size']:,} images."]
    for w in s.get("warnings", []):
        lines += ["", f"Warning: {w}"]
    for eval_set, models in s.get("metrics", {}).items():
        knn = {m: v["knn_top1_k20"] for m, v in models.items() if "knn_top1_k20" in v}
        if knn:
            lines += ["", f"kNN on {eval_set} (top-1 %, 20-NN): " + ", ".join(f"{m} {v:.2f}" for m, v in knn.items())]
    if "report" in s:
        lines += ["", f"Report: `{s['report']}`"]
    return "\n".join(lines)


def publish(markdown: str, description: str, key: str | None = None) -> None:
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as e:  # no API, or outside a run: the run goes on without it
        log.warning("no Prefect artifact (%s): %s", description, e)
