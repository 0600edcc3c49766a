"""Run the configured frozen-feature benchmarks for a set of feature extractors and record the results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from evaluation.knn import knn_accuracy
from infra.config.data import EvalSetConfig
from infra.config.evaluate import EvaluateConfig
from infra.datasets import iter_images
from infra.images import decode
from infra.stage import StageResult
from infra.storage import atomic_path, atomic_write_json

Extractor = Callable[[list[Image.Image]], np.ndarray]
RESULTS = "results.parquet"
METRICS = "metrics.json"


def load_split(path: Path, fmt: str = "auto") -> tuple[list[Image.Image], np.ndarray]:
    images, labels = [], []
    for item in iter_images(path, fmt):
        if item.label is None:
            raise ValueError(f"{path}: image {item.name} has no label; evaluation splits need class labels")
        images.append(decode(item.data))
        labels.append(item.label)
    return images, np.asarray(labels, dtype=np.int64)


def run_knn(eval_sets: list[EvalSetConfig], extractors: dict[str, Extractor], cfg: EvaluateConfig) -> pd.DataFrame:
    """One row per (eval set, model, metric)."""
    rows = []
    for ev in eval_sets:
        train_x, train_y = load_split(ev.train, ev.format)
        test_x, test_y = load_split(ev.test, ev.format)
        for model, extract in extractors.items():
            metrics = knn_accuracy(extract(train_x), train_y, extract(test_x), test_y, cfg.knn.ks, cfg.knn.temperature)
            rows += [{"eval_set": ev.name, "model": model, "protocol": "knn", "metric": m, "value": v} for m, v in metrics.items()]
    return pd.DataFrame(rows, columns=["eval_set", "model", "protocol", "metric", "value"])


def evaluate(
    eval_sets: list[EvalSetConfig], extractors: dict[str, Extractor], cfg: EvaluateConfig, out_dir: Path
) -> StageResult:
    results = run_knn(eval_sets, extractors, cfg)
    with atomic_path(out_dir / RESULTS) as tmp:
        results.to_parquet(tmp, index=False)
    nested: dict[str, dict[str, dict[str, float]]] = {}
    for r in results.itertuples(index=False):
        nested.setdefault(r.eval_set, {}).setdefault(r.model, {})[f"{r.protocol}_{r.metric}"] = round(r.value, 4)
    atomic_write_json(out_dir / METRICS, nested)
    return StageResult(counts={"results": len(results)}, outputs=[out_dir / RESULTS, out_dir / METRICS], extra={"metrics": nested})
