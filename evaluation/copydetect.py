"""Copy detection: micro average precision over all (query, reference) predictions (DISC21 / SSCD protocol).

Each query contributes its top-k references by cosine similarity as scored predictions. All predictions of all
queries are pooled and sorted by score; micro-AP is sum over the sorted list of precision@i x (recall_i -
recall_{i-1}), with recall over every ground-truth pair (pairs never predicted cap the recall). Queries without a
copy (distractors) only add false positives, which is what makes a global threshold hard.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


def predictions(query: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, reference index, score) of each query's top-k references; rows are L2-normalised."""
    sims = np.asarray(query, np.float32) @ np.asarray(reference, np.float32).T
    k = min(k, sims.shape[1])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    q = np.repeat(np.arange(len(query)), k)
    return q, top.ravel(), np.take_along_axis(sims, top, 1).ravel()


def micro_ap(scores: np.ndarray, correct: np.ndarray, n_ground_truth: int) -> float:
    """Micro-AP of scored predictions (``correct``: is the pair a true copy) against ``n_ground_truth`` pairs.

    Ties in score are broken by listing the incorrect predictions first (a pessimistic, order-free convention).
    """
    if n_ground_truth == 0:
        return float("nan")
    order = np.lexsort((np.asarray(correct, bool), -np.asarray(scores, np.float64)))
    hits = np.asarray(correct, bool)[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / n_ground_truth)


@dataclass
class CopyDetectionResult:
    micro_ap: float
    recall_at_1: float  # share of queries with a copy whose top-1 reference is that copy's source


def evaluate_copies(query: np.ndarray, reference: np.ndarray, truth: Iterable[tuple[int, int]], k: int = 10) -> CopyDetectionResult:
    pairs = set(truth)
    q, r, s = predictions(query, reference, k)
    correct = np.array([(a, b) in pairs for a, b in zip(q.tolist(), r.tolist(), strict=True)], bool)
    first = r.reshape(len(query), -1)[:, 0]  # each query's top-1 reference
    with_copy = sorted({a for a, _ in pairs})
    r1 = np.mean([(a, int(first[a])) in pairs for a in with_copy]) * 100 if with_copy else float("nan")
    return CopyDetectionResult(micro_ap(s, correct, len(pairs)) * 100, float(r1))


def read_ground_truth(path: Path, max_distractors: int = 500, seed: int = 0) -> pd.DataFrame:
    """``query``, ``reference`` (absolute paths; reference None for a distractor query).

    Accepts a table with ``query`` / ``reference`` columns (paths relative to the table's folder), or the demo
    crawl's ``truth.parquet`` (``eval_copy`` rows are copies of ``of``; digit rows become distractor queries).
    """
    path = Path(path)
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    root = path.parent
    if {"query", "reference"} <= set(table.columns):
        out = table[["query", "reference"]].copy()
    elif {"kind", "name", "of"} <= set(table.columns):
        copies = table[table["kind"] == "eval_copy"]
        pool = table[table["kind"].isin(["mnist", "digits"])]
        pool = pool.sample(min(max_distractors, len(pool)), random_state=seed).sort_index()
        out = pd.concat([
            pd.DataFrame({"query": "images/" + copies["name"], "reference": copies["of"]}),
            pd.DataFrame({"query": "images/" + pool["name"], "reference": None}),
        ], ignore_index=True)  # fmt: skip
    else:
        raise ValueError(f"{path}: expected columns query/reference (or the demo truth table), got {list(table.columns)}")

    def absolute(p: object) -> str | None:
        if p is None or (isinstance(p, float) and np.isnan(p)) or p == "":
            return None
        return str(Path(str(p)) if Path(str(p)).is_absolute() else root / str(p))

    return pd.DataFrame({"query": out["query"].map(absolute), "reference": out["reference"].map(absolute)})
