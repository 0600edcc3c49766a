"""Evaluation results on disk, and comparing two runs.

Each evaluation writes ``results.parquet`` (one row per benchmark x model x protocol x metric, with provenance) and
``metrics.json`` (nested ``{benchmark: {model: {"<protocol>_<metric>": value}}}``) in its own directory, and appends
the same rows to the table ``<runs root>/results/`` (one parquet part per evaluation id, replaced when that
evaluation reruns), so every evaluation ever made under a root can be queried together.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.dataset as ds

from infra.run import now
from infra.storage import atomic_path, atomic_write_json

RESULTS = "results.parquet"
METRICS = "metrics.json"
TABLE_DIR = "results"
KEY = ["benchmark", "protocol", "model", "metric"]
PROTOCOL_SECTIONS = {"knn": "knn", "linear": "linear", "logreg": "logreg", "dense_linear": "dense",
                     "copy_detection": "copy_detection", "retrieval": None}  # fmt: skip


def protocol_config_hash(cfg: Any, benchmark: Any, protocol: str) -> str:
    """Hash of what a number depends on besides data and weights: the protocol's settings and the benchmark kind.

    Paths are left out on purpose (the dataset digest identifies the data, wherever it lives).
    """
    section = PROTOCOL_SECTIONS.get(protocol)
    settings = getattr(cfg, section).model_dump(mode="json") if section else {}
    decl = {k: v for k, v in benchmark.model_dump(mode="json").items() if k not in ("train", "test", "val", "images",
                                                                                    "gnd", "ground_truth", "references", "root")}  # fmt: skip
    blob = json.dumps({"protocol": protocol, "settings": settings, "benchmark": decl}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def annotate(results: pd.DataFrame, run_id: str, models: dict[str, dict[str, Any]], cfg: Any,
             benchmarks: list[Any]) -> pd.DataFrame:  # fmt: skip
    """Add provenance columns: run id, time, model role / checkpoint / fingerprint, config hash."""
    by_name = {b.name: b for b in benchmarks}
    out = results.copy()
    out.insert(0, "run_id", run_id)
    out.insert(1, "evaluated_at", now())
    for col in ("role", "checkpoint", "fingerprint"):
        out[col] = out["model"].map(lambda m, c=col: models.get(m, {}).get(c))
    out["config_hash"] = [protocol_config_hash(cfg, by_name[b], p) for b, p in zip(out["benchmark"], out["protocol"], strict=True)]
    return out


def nested_metrics(results: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    nested: dict[str, dict[str, dict[str, float]]] = {}
    for r in results.itertuples(index=False):
        nested.setdefault(r.benchmark, {}).setdefault(r.model, {})[f"{r.protocol}_{r.metric}"] = round(float(r.value), 4)
    return nested


def write_results(out_dir: Path, results: pd.DataFrame) -> list[Path]:
    out_dir = Path(out_dir)
    with atomic_path(out_dir / RESULTS) as tmp:
        results.to_parquet(tmp, index=False)
    atomic_write_json(out_dir / METRICS, nested_metrics(results))
    return [out_dir / RESULTS, out_dir / METRICS]


def append_to_table(root: Path, results: pd.DataFrame) -> Path:
    """Add this evaluation's rows to ``<root>/results/`` as its part (a parquet table read as one dataset).

    The part is named by the evaluation's id (the pipeline's run id, or ``lvd evaluate``'s evaluation id), one
    evaluation per id, so a rerun replaces its rows instead of adding them again: an evaluate stage killed after
    this write but before its manifest reruns to the same table.
    """
    ids = set(results["run_id"].astype(str))
    if len(ids) > 1:
        raise ValueError(f"one evaluation per table part: got run ids {sorted(ids)}")
    if not ids:  # nothing evaluated, nothing to add
        return Path(root) / TABLE_DIR
    run_id = ids.pop()
    if Path(run_id).name != run_id or run_id.startswith("."):
        raise ValueError(f"run id {run_id!r} cannot name a file in {Path(root) / TABLE_DIR}")
    path = Path(root) / TABLE_DIR / f"{run_id}.parquet"
    with atomic_path(path) as tmp:
        results.to_parquet(tmp, index=False)
    # Parts of the same evaluation written under the earlier "<id>-<UTC stamp>.parquet" names are replaced too.
    legacy = re.compile(re.escape(run_id) + r"-\d{8}T\d{9}\+0000\.parquet")
    for old in path.parent.glob(f"{glob.escape(run_id)}-*.parquet"):
        if legacy.fullmatch(old.name):
            old.unlink()
    return path


def read_table(root: Path) -> pd.DataFrame:
    parts = sorted((Path(root) / TABLE_DIR).glob("*.parquet"))
    if not parts:
        return pd.DataFrame()
    return ds.dataset([str(p) for p in parts], format="parquet").to_table().to_pandas()


def run_results(root: Path, run_id: str) -> pd.DataFrame:
    """The results of a pipeline run (``stages/evaluate``) or of an ``lvd evaluate`` run (its own folder)."""
    for p in (Path(root) / run_id / "stages" / "evaluate" / RESULTS, Path(root) / run_id / RESULTS):
        if p.is_file():
            return pd.read_parquet(p)
    raise FileNotFoundError(f"no evaluation results for {run_id!r} under {root}")


def natural(text: Any) -> str:
    """A sort key that orders the numbers inside names by value: k10 < k20 < k100, top1 < top5."""
    return re.sub(r"\d+", lambda m: m.group().zfill(12), str(text))


def _natural_sort(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return frame.sort_values(columns, key=lambda col: col.map(natural), kind="stable")


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Side by side on (benchmark, protocol, model, metric): a, b, b - a, and whether data and settings match."""
    cols = [*KEY, "value", "dataset_digest", "config_hash"]
    left, right = a[[c for c in cols if c in a]], b[[c for c in cols if c in b]]
    m = left.merge(right, on=KEY, how="outer", suffixes=("_a", "_b"))
    m["delta"] = m["value_b"] - m["value_a"]
    for col in ("dataset_digest", "config_hash"):
        if f"{col}_a" in m and f"{col}_b" in m:
            m[f"same_{col.split('_')[0]}"] = m[f"{col}_a"] == m[f"{col}_b"]
    return _natural_sort(m, KEY).reset_index(drop=True)


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns as wide as their widest cell (whole names: run ids, models), numbers aligned right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [" ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            .rstrip() for r in [header, *rows]]


def _flags(r: Any) -> str:
    if pd.isna(r.value_a) or pd.isna(r.value_b):
        return ""
    flags = [text for attr, text in (("same_dataset", "different data"), ("same_config", "different settings"))
             if hasattr(r, attr) and not getattr(r, attr)]
    return f"({', '.join(flags)})" if flags else ""


def format_compare(m: pd.DataFrame, name_a: str, name_b: str) -> str:
    rows = []
    for r in m.itertuples(index=False):
        va = "" if pd.isna(r.value_a) else f"{r.value_a:.2f}"
        vb = "" if pd.isna(r.value_b) else f"{r.value_b:.2f}"
        d = "" if pd.isna(r.delta) else f"{r.delta:+.2f}"
        rows.append([r.benchmark, r.protocol, r.model, r.metric, va, vb, d, _flags(r)])
    header = ["benchmark", "protocol", "model", "metric", name_a, name_b, "delta", ""]
    return "\n".join(_table(header, rows, right={4, 5, 6}))


def format_results(results: pd.DataFrame) -> str:
    """One line per (benchmark, protocol, metric), one column per model."""
    models = list(dict.fromkeys(results["model"]))
    wide = results.pivot_table(index=["benchmark", "protocol", "metric"], columns="model", values="value", aggfunc="first")
    wide = wide.iloc[sorted(range(len(wide)), key=lambda i: tuple(natural(k) for k in wide.index[i]))]
    rows = [[*key, *(f"{row.get(m, float('nan')):.2f}" for m in models)] for key, row in wide.iterrows()]
    return "\n".join(_table(["benchmark", "protocol", "metric", *models], rows, right=set(range(3, 3 + len(models)))))
