"""What a person wants to see of a run: per-stage state and counts, corpus size, and the evaluation results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infra.config import PipelineConfig
from infra.history import attempts, describe
from infra.manifest import read_manifest
from infra.run import RunDir
from infra.storage import read_json

STAGE_NAMES = ("crawl", "ingest", "nsfw", "faces", "dedup", "embed", "retrieve", "rebalance", "corpus", "pretrain",
               "pretrain_highres", "distill", "evaluate")
OPTIONAL = {"pretrain_highres": "highres", "distill": "distill"}  # listed only where `train.<section>.enabled`


def _state(run: RunDir, stage: str, failed: set[str]) -> str:
    if read_manifest(run.stage_dir(stage)) is not None:
        return "completed"
    if stage in failed:
        return "failed"
    return "partial" if run.stage_dir(stage).exists() else "pending"


def run_summary(run: RunDir, cfg: PipelineConfig, stages: tuple[str, ...] = STAGE_NAMES,
                progress: Callable[[RunDir, str], str | None] | None = None) -> dict[str, Any]:
    """`progress(run, stage)`: where an unfinished stage continues (`flows.stages.stage_progress`), for the
    stages that are partial or failed."""
    events = run.events()
    last = {}
    for e in events:
        if e.get("stage"):
            last[e["stage"]] = e["event"]
    failed = {s for s, ev in last.items() if ev == "failed"}
    rows = []
    for stage in stages:
        if stage == "crawl" and not cfg.demo.enabled:
            continue
        if stage in OPTIONAL and not getattr(cfg.train, OPTIONAL[stage]).enabled:
            continue
        m = read_manifest(run.stage_dir(stage))
        counts = m.counts if m else {}
        dropped = counts.get("dropped", {}) if isinstance(counts.get("dropped"), dict) else {}
        state = _state(run, stage, failed)
        rows.append({"stage": stage, "state": state, "kept": counts.get("kept"),
                     "dropped": sum(dropped.values()) if dropped else 0, "reasons": dropped})  # fmt: skip
        if progress is not None and state in ("partial", "failed"):
            rows[-1]["progress"] = progress(run, stage)
    out: dict[str, Any] = {"run_id": run.run_id, "path": str(run.path), "stages": rows,
                           "attempts": describe(attempts(run))}
    corpus = read_manifest(run.stage_dir("corpus"))
    if corpus:
        out["corpus_size"] = corpus.counts.get("kept")
    metrics_path = run.stage_dir("evaluate") / "metrics.json"
    if metrics_path.is_file():
        out["metrics"] = read_json(metrics_path)
    if (run.path / "report.html").is_file():
        out["report"] = str(run.path / "report.html")
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"run {s['run_id']}  ({s['path']})", "", f"{'stage':<10} {'state':<10} {'kept':>8} {'dropped':>8}  reasons"]
    for r in s["stages"]:
        kept = "" if r["kept"] is None else str(r["kept"])
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(r["reasons"].items()) if v)
        if r.get("progress"):
            reasons = r["progress"]
        lines.append(f"{r['stage']:<10} {r['state']:<10} {kept:>8} {r['dropped']:>8}  {reasons}")
    if s.get("attempts"):
        lines += ["", "attempts:"]
        for a in s["attempts"]:
            lines += [f"{a['attempt']:>3}  {a['started'][:16].replace('T', ' ')}  {a['by']}: {a['ended']}",
                      f"     {a['what']}"]
    if "corpus_size" in s:
        lines += ["", f"corpus: {s['corpus_size']} images"]
    for eval_set, models in s.get("metrics", {}).items():
        if not any("knn_top1_k20" in m for m in models.values()):
            continue  # not a classification benchmark
        lines += ["", f"kNN on {eval_set} (top-1 %, 20-NN):"]
        for model, m in models.items():
            lines.append(f"  {model:<12} {m.get('knn_top1_k20', float('nan')):6.2f}")
    if "report" in s:
        lines += ["", f"report: {s['report']}"]
    return "\n".join(lines)
