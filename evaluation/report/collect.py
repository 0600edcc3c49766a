"""What the report shows, read from a run directory only (config, manifests, ledger, stage tables, metrics).

Every function returns plain tables; a missing input raises :class:`Missing` with a sentence for the reader, so
a run stopped early (or a stage that was switched off) still gets a report with the sections it has.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from infra import history
from infra.config import ConfigError, PipelineConfig, parse_yaml
from infra.domains import domains as domain_table
from infra.history import Attempt
from infra.lineage import STAGE_ORDER, Ledger, superseded
from infra.manifest import StageManifest, read_manifest
from infra.run import RunDir

PIPELINE = [s for s in STAGE_ORDER if s not in ("crawl", "pretrain", "evaluate", "embed")]


class Missing(LookupError):
    """An input of a section is absent from the run; the message says which and why it matters."""


@dataclass
class Run:
    path: Path
    # Face blurring for images the report shows that did not pass the pool's faces stage (seed queries, evaluation
    # images): the run's own detector (flows passes it in). None: such images are not shown.
    blur: Callable[[bytes], bytes] | None = None

    @property
    def run_id(self) -> str:
        return self.path.name

    def stage(self, name: str) -> Path:
        return self.path / "stages" / name

    def manifest(self, name: str) -> StageManifest | None:
        return read_manifest(self.stage(name))

    def config(self) -> dict[str, Any]:
        """The resolved configuration as saved in the run (raw YAML: a report must not depend on today's schema)."""
        p = self.path / "config.yaml"
        if not p.is_file():
            raise Missing(f"{p} is missing: this is not a run directory")
        return parse_yaml(p.read_text()) or {}

    def pipeline_config(self) -> PipelineConfig | None:
        """The configuration under today's schema (None when it no longer parses: the report still renders)."""
        try:
            return RunDir(self.path.parent, self.run_id).load_config()
        except (ConfigError, OSError, ValueError):
            return None

    def require(self, rel: str, what: str) -> Path:
        p = self.path / rel
        if not p.exists():
            raise Missing(f"{what}: not in this run ({rel} is missing).")
        return p

    def ledger(self, expr: ds.Expression, columns: list[str] | None = None) -> pd.DataFrame:
        return Ledger(self.path).query(expr, columns)


# --- attempts --------------------------------------------------------------------------------------------------
def attempts(run: Run) -> list[Attempt]:
    """The run's history (`infra.history.attempts`)."""
    run.require("events.jsonl", "The run's history")
    return history.attempts(RunDir(run.path.parent, run.run_id))


def details(frame: pd.DataFrame) -> pd.DataFrame:
    """The ledger's JSON ``detail`` column expanded into columns."""
    parsed = [json.loads(d) if isinstance(d, str) and d else {} for d in frame["detail"]]
    return pd.concat([frame.drop(columns=["detail"]).reset_index(drop=True), pd.DataFrame(parsed)], axis=1)


# --- funnel ----------------------------------------------------------------------------------------------------
def funnel(run: Run) -> pd.DataFrame:
    """Per pipeline stage: rows entering, dropped (by reason) and continuing; from terminal ledger events."""
    inputs = run.ledger((ds.field("stage") == "ingest") & (ds.field("reason") == "input"), ["row_id"])
    if inputs.empty:
        raise Missing("The ingest ledger has no input events (ingest did not run).")
    drops = run.ledger((ds.field("kind") == "drop") & ds.field("row_id").is_valid(),
                       ["stage", "reason", "row_id", "attempt"])  # fmt: skip
    drops = drops[~superseded(drops, Ledger(run.path))]  # an ingest drop that a retry replaced is not an outcome
    remaining = int(inputs["row_id"].nunique())
    rows = []
    for stage in PIPELINE:
        if run.manifest(stage) is None and not (run.stage(stage) / "ledger").is_dir():
            continue
        here = drops[drops["stage"] == stage]
        reasons = here.groupby("reason")["row_id"].nunique().sort_values(ascending=False)
        n_drop = int(reasons.sum())
        rows.append({"stage": stage, "in": remaining, "dropped": n_drop, "out": remaining - n_drop,
                     "reasons": {str(k): int(v) for k, v in reasons.items()}})  # fmt: skip
        remaining -= n_drop
    return pd.DataFrame(rows)


def domains(run: Run) -> pd.DataFrame:
    """Per host: URLs, requested, downloaded, rate, in corpus, failures (see :mod:`infra.domains`)."""
    cfg = run.pipeline_config()
    frame = domain_table(run.path, local=bool(cfg is not None and cfg.ingest.local_roots))
    if frame.empty:
        raise Missing("The ingest ledger is missing (ingest did not run): no per-host download statistics.")
    return frame


# --- safety ----------------------------------------------------------------------------------------------------
def nsfw_scores(run: Run) -> tuple[np.ndarray, float | None, int]:
    """(scores, threshold, images dropped)."""
    files = sorted((run.stage("nsfw") / "scores").glob("*.parquet"))
    if files:
        frames = [pd.read_parquet(f) for f in files]
        t = pd.concat([f for f in frames if len(f)] or frames[:1])  # empty shards (e.g. a retry's) add nothing
        scores = t["nsfw_score"].dropna().to_numpy(np.float64)
        n_drop = int(t["dropped"].sum()) if "dropped" in t else 0
    else:
        ev = run.ledger((ds.field("stage") == "nsfw") & (ds.field("reason") == "nsfw_score"))
        if ev.empty:
            raise Missing("No NSFW scores in this run (the nsfw stage did not run).")
        scores = details(ev)["score"].to_numpy(np.float64)
        n_drop = len(run.ledger((ds.field("stage") == "nsfw") & (ds.field("kind") == "drop"), ["row_id"]))
    m = run.manifest("nsfw")
    threshold = m.extra.get("threshold") if m else None
    return scores, threshold, n_drop


def faces(run: Run) -> pd.DataFrame:
    """One row per image the face stage saw: image_id, n_faces."""
    ev = run.ledger((ds.field("stage") == "faces") & (ds.field("reason") == "faces"))
    if ev.empty:
        raise Missing("No face-detection events in this run (the faces stage did not run).")
    d = details(ev)
    return d[["image_id", "n_faces"]].assign(n_faces=lambda f: f["n_faces"].fillna(0).astype(int))


# --- dedup -----------------------------------------------------------------------------------------------------
def dedup_components(run: Run) -> pd.DataFrame:
    """image_id, row_id, component, component_size, representative, eval_match (one row per image)."""
    path = run.stage("dedup") / "components.parquet"
    if path.is_file():
        t = pd.read_parquet(path)
    else:
        ev = run.ledger((ds.field("stage") == "dedup") & (ds.field("reason") == "dup_component"))
        if ev.empty:
            raise Missing("No duplicate components in this run (the dedup stage did not run).")
        t = details(ev).rename(columns={"size": "component_size"}).assign(eval_match=None)
    if "component" not in t.columns:  # a component is named by its representative image
        t = t.assign(component=t["representative"])
    return t


def contaminations(run: Run) -> pd.DataFrame:
    """image_id, eval_image ("set/split/name") of every pool image dropped for touching an evaluation image."""
    ev = run.ledger((ds.field("stage") == "dedup") & (ds.field("reason") == "eval_contamination"))
    return details(ev)[["image_id", "eval_image"]] if not ev.empty else pd.DataFrame(columns=["image_id", "eval_image"])


# --- retrieval -------------------------------------------------------------------------------------------------
def retrievals(run: Run) -> pd.DataFrame:
    """One row per (query, retrieved pool image): seed_set, query, image_id, similarity."""
    ev = run.ledger((ds.field("stage") == "retrieve") & (ds.field("reason") == "retrieved"))
    if ev.empty:
        raise Missing("No retrieval events in this run (the retrieve stage did not run or retrieved nothing).")
    return details(ev)[["seed_set", "method", "query", "image_id", "similarity"]]


# --- rebalancing -----------------------------------------------------------------------------------------------
def cluster_levels(run: Run) -> tuple[pd.DataFrame, list[str]]:
    """The rebalance table (one row per retrieved image: cluster_l1.., selected) and its level columns."""
    path = run.require("stages/rebalance/selected.parquet", "The rebalancing selection")
    t = pd.read_parquet(path)
    levels = sorted((c for c in t.columns if c.startswith("cluster_l")), key=lambda c: int(c.removeprefix("cluster_l")))
    if not levels:
        raise Missing("Rebalancing ran without clustering (rebalance.enabled is false), so there are no clusters.")
    return t, levels


# --- corpus, training, evaluation ------------------------------------------------------------------------------
def composition(run: Run) -> pd.DataFrame:
    return pd.read_parquet(run.require("stages/corpus/composition.parquet", "The corpus composition"))


TRAINING_STAGES = ("pretrain", "pretrain_highres", "distill")  # in pipeline order; the follow-ups are optional


def training_metrics(run: Run, stage: str = "pretrain") -> pd.DataFrame:
    return pd.read_csv(run.require(f"stages/{stage}/metrics.csv", "The training log (metrics.csv)"))


def training_stages(run: Run) -> list[str]:
    """pretrain, then the follow-up training stages this run has a log of."""
    return ["pretrain"] + [s for s in TRAINING_STAGES[1:] if (run.stage(s) / "metrics.csv").is_file()]


def eval_results(run: Run) -> pd.DataFrame:
    return pd.read_parquet(run.require("stages/evaluate/results.parquet", "Evaluation results"))
