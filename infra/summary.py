"""What a person wants to see of a run: per-stage state and counts, corpus size, and the evaluation results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infra import plan
from infra.code import changed_since, named
from infra.config import PipelineConfig
from infra.history import attempts, describe
from infra.manifest import read_manifest
from infra.run import RunDir
from infra.run_lock import holder
from infra.storage import read_json


def _state(run: RunDir, stage: str, failed: set[str]) -> str:
    if read_manifest(run.stage_dir(stage)) is not None:
        return "completed"
    if stage in failed:
        return "failed"
    return "partial" if run.stage_dir(stage).exists() else "pending"


def run_summary(run: RunDir, cfg: PipelineConfig,
                progress: Callable[[RunDir, str], str | None] | None = None) -> dict[str, Any]:
    """One row per stage of the configuration's pipeline (`infra.plan.listed`); a stage it does not run is "not run",
    with why. `progress(run, stage)`: where an unfinished stage continues (`flows.resume_points.stage_progress`), for the
    stages that are partial or failed."""
    events = run.events()
    last = {}
    for e in events:
        if e.get("stage"):
            last[e["stage"]] = e["event"]
    failed = {s for s, ev in last.items() if ev == "failed"}
    rows = []
    skipped = plan.not_run(cfg)
    for stage in plan.listed(cfg):
        m = read_manifest(run.stage_dir(stage))
        counts = m.counts if m else {}
        dropped = counts.get("dropped", {}) if isinstance(counts.get("dropped"), dict) else {}
        state = "not run" if stage in skipped and m is None else _state(run, stage, failed)
        code = changed_since(m.key_detail["code"]) if state == "completed" and "code" in m.key_detail else []
        state = "stale" if code else state
        rows.append({"stage": stage, "state": state, "kept": counts.get("kept"),
                     "dropped": sum(dropped.values()) if dropped else 0, "reasons": dropped})  # fmt: skip
        if state == "not run":
            rows[-1]["why"] = skipped[stage]
        if code:
            rows[-1]["why"] = f"its code changed since it completed ({named(code)}): a re-run computes it again"
        if progress is not None and state in ("partial", "failed"):
            rows[-1]["progress"] = progress(run, stage)
    out: dict[str, Any] = {"run_id": run.run_id, "path": str(run.path), "stages": rows,
                           "attempts": describe(attempts(run), holder(run.path))}
    corpus = read_manifest(run.stage_dir("corpus"))
    if corpus:
        out["corpus_size"] = corpus.counts.get("kept")
        out["corpus_from_pool"] = corpus.counts.get("from_pool")
        out["corpus_as_is"] = corpus.counts.get("as_is") or {}
    out["warnings"] = warnings(cfg)
    metrics_path = run.stage_dir("evaluate") / "metrics.json"
    if metrics_path.is_file():
        out["metrics"] = read_json(metrics_path)
    if (run.path / "report.html").is_file():
        out["report"] = str(run.path / "report.html")
    return out


def warnings(cfg: PipelineConfig) -> list[str]:
    """What a person must know about how the run's results came about (also shown by the report)."""
    out = []
    if plan.embeds_without_weights(cfg) and "embed" in plan.active(cfg):
        b = cfg.embed.backbone
        out.append(f"the embedder ({b.kind}:{b.arch}) has no weights: retrieval and rebalancing ran on a randomly "
                   "initialised network (embed.allow_random_init). Give embed.backbone.path a pretrained model.")
    return out


def _composition(s: dict[str, Any]) -> str:
    """How the corpus is made: the pool images rebalancing selected, plus the seed images added as they are."""
    as_is, pool = s.get("corpus_as_is") or {}, s.get("corpus_from_pool")
    if pool is None or not as_is:
        return ""
    sets = ", ".join(f"{k} {v:,}" for k, v in sorted(as_is.items()))
    return f" = {pool:,} pool images selected + {sum(as_is.values()):,} seed images added as they are ({sets})"


def row_note(r: dict[str, Any]) -> str:
    """A stage row's last column: why it is not run or stale, where it continues, else its drop reasons."""
    return r.get("why") or r.get("progress") or ", ".join(f"{k}={v}" for k, v in sorted(r["reasons"].items()) if v)


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"run {s['run_id']}  ({s['path']})", "", f"{'stage':<10} {'state':<10} {'kept':>8} {'dropped':>8}  reasons"]
    for r in s["stages"]:
        kept = "" if r["kept"] is None else str(r["kept"])
        lines.append(f"{r['stage']:<10} {r['state']:<10} {kept:>8} {r['dropped']:>8}  {row_note(r)}")
    if s.get("attempts"):
        lines += ["", "attempts:"]
        for a in s["attempts"]:
            lines += [f"{a['attempt']:>3}  {a['started'][:16].replace('T', ' ')}  {a['by']}: {a['ended']}",
                      f"     {a['what']}"] + ([f"     on {a['on']}"] if a.get("on") else [])
            lines += [f"     peak memory {a['peak']}"] if a.get("peak") else []
    if "corpus_size" in s:
        lines += ["", f"corpus: {s['corpus_size']:,} images" + _composition(s)]
    for w in s.get("warnings", []):
        lines += ["", f"warning: {w}"]
    for eval_set, models in s.get("metrics", {}).items():
        if not any("knn_top1_k20" in m for m in models.values()):
            continue  # not a classification benchmark
        lines += ["", f"kNN on {eval_set} (top-1 %, 20-NN):"]
        for model, m in models.items():
            lines.append(f"  {model:<12} {m.get('knn_top1_k20', float('nan')):6.2f}")
    if "report" in s:
        lines += ["", f"report: {s['report']}"]
    return "\n".join(lines)
