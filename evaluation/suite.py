"""Run the configured benchmarks for a set of models and record the results.

Features are extracted once per (model, dataset) through :class:`FeatureExtractor` (cached on disk); every
protocol below is a pure function of those features. One result row per (benchmark, model, protocol, metric),
with the provenance that makes runs comparable: checkpoint and its fingerprint, the config hash of the
benchmark + protocol settings, and the digest of the benchmark's images and labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from evaluation.copydetect import evaluate_copies, read_ground_truth
from evaluation.dense import (
    class_count,
    dense_linear_probe,
    majority_baseline,
    mask_transform,
    mean_iou,
    patch_majority,
    read_segmentation_split,
    reduce_zero_label,
)
from evaluation.features import FeatureExtractor, FeatureModel, ImageSet, image_set_from_files, read_image_set
from evaluation.knn import knn_accuracy
from evaluation.linear import holdout_split, linear_probe, lr_grid
from evaluation.logreg import c_grid, logistic_regression
from evaluation.results import annotate, append_to_table, nested_metrics, write_results
from evaluation.retrieval import load_revisited_gnd, revisited_map
from infra.config.data import EvalSetConfig
from infra.config.evaluate import (
    ClassificationBenchmark,
    CopyDetectionBenchmark,
    EvaluateConfig,
    RetrievalBenchmark,
    SegmentationBenchmark,
)  # fmt: skip
from infra.console import Progress
from infra.images import decode
from infra.precision import resolve
from infra.stage import StageResult
from infra.storage import sha256_bytes

log = logging.getLogger(__name__)
COLUMNS = ["benchmark", "kind", "protocol", "model", "metric", "value", "detail", "dataset_digest"]


@dataclass
class EvalModel:
    features: FeatureModel
    role: str = "model"  # pretrained | baseline | reference | model
    checkpoint: str | None = None

    @property
    def name(self) -> str:
        return self.features.name


Rows = list[dict[str, Any]]


def _row(b: Any, protocol: str, model: EvalModel, metric: str, value: float, digest: str, **detail: Any) -> dict:
    return {"benchmark": b.name, "kind": b.kind, "protocol": protocol, "model": model.name, "metric": metric,
            "value": float(value), "detail": json.dumps(detail, sort_keys=True, default=str), "dataset_digest": digest}


def combine_digests(*digests: str) -> str:
    return hashlib.sha256(":".join(digests).encode()).hexdigest()


def classification_benchmarks(eval_sets: Iterable[EvalSetConfig]) -> list[ClassificationBenchmark]:
    return [ClassificationBenchmark(name=e.name, train=e.train, test=e.test, val=e.val, format=e.format) for e in eval_sets]


# --- classification: kNN, linear probe, logistic regression ----------------------------------------------------
def run_classification(b: ClassificationBenchmark, models: list[EvalModel], cfg: EvaluateConfig,
                       extract: FeatureExtractor) -> Rows:  # fmt: skip
    protocols = b.protocols or cfg.protocols
    train, test = read_image_set(b.train, b.format), read_image_set(b.test, b.format)
    val = read_image_set(b.val, b.format) if b.val is not None else None
    digest = combine_digests(train.digest, test.digest, val.digest if val else "")
    n_classes = int(max(train.labels.max(), test.labels.max())) + 1
    rows: Rows = []
    for m in models:
        ftr, fte = extract(m.features, train), extract(m.features, test)
        ytr, yte = train.labels, test.labels
        if "knn" in protocols:
            t0 = time.perf_counter()
            acc = knn_accuracy(ftr.global_, ytr, fte.global_, yte, cfg.knn.ks, cfg.knn.temperature)
            rows += [_row(b, "knn", m, k, v, digest, seconds=round(time.perf_counter() - t0, 3)) for k, v in acc.items()]
        if "linear" in protocols:
            rows += _linear(b, m, cfg, ftr, ytr, fte, yte, val and (extract(m.features, val), val.labels), n_classes, digest)
        if "logreg" in protocols:
            t0 = time.perf_counter()
            lc = cfg.logreg
            res = logistic_regression(ftr.cls[:, -1], ytr, fte.cls[:, -1], yte, val_fraction=lc.val_fraction,
                                      cs=c_grid(lc.c_min_exp, lc.c_max_exp, lc.n_c), max_iter=lc.max_iter, tol=lc.tol)
            detail = {"C": res.best_c, "n_c": lc.n_c, "seconds": round(time.perf_counter() - t0, 3)}
            rows += [_row(b, "logreg", m, "top1", res.test_top1, digest, **detail),
                     _row(b, "logreg", m, "top5", res.test_top5, digest, **detail)]  # fmt: skip
    return rows


def _linear(b: ClassificationBenchmark, m: EvalModel, cfg: EvaluateConfig, ftr: Any, ytr: np.ndarray, fte: Any,
            yte: np.ndarray, val: Any, n_classes: int, digest: str) -> Rows:  # fmt: skip
    lc = cfg.linear
    t0 = time.perf_counter()
    if val:
        fval, yval = val
        fit_f, fit_y = ftr, ytr
    else:
        fit_idx, val_idx = holdout_split(len(ytr), lc.val_fraction)
        fit_f, fit_y, fval, yval = ftr.take(fit_idx), ytr[fit_idx], ftr.take(val_idx), ytr[val_idx]
    res = linear_probe(fit_f, fit_y, fval, yval, fte, yte, n_classes, n_last_blocks=lc.n_last_blocks,
                       avgpool=lc.avgpool, lrs=lr_grid(lc.lr_grid), batch_size=lc.batch_size,
                       iterations=lc.iterations, momentum=lc.momentum, weight_decay=lc.weight_decay)  # fmt: skip
    detail = {"best": res.best.name, "n_last": res.best.n_last, "avgpool": res.best.avgpool, "lr": res.best.base_lr,
              "val_top1": res.val_top1[res.best.name], "iterations": lc.iterations,
              "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    return [_row(b, "linear", m, "top1", res.test_top1, digest, **detail),
            _row(b, "linear", m, "top5", res.test_top5, digest, **detail)]  # fmt: skip


# --- retrieval, copy detection, segmentation -------------------------------------------------------------------
def _crops(files: list[Path], boxes: list[list[float] | None]) -> ImageSet:
    def load() -> Iterator[Image.Image]:
        for f, box in zip(files, boxes, strict=True):
            img = decode(f.read_bytes())
            yield img.crop(tuple(round(v) for v in box)) if box else img

    ids = [f"{sha256_bytes(f.read_bytes())}:{box}" for f, box in zip(files, boxes, strict=True)]
    return ImageSet(ids, load, None, [str(f) for f in files])


def run_retrieval(b: RetrievalBenchmark, models: list[EvalModel], cfg: EvaluateConfig,
                  extract: FeatureExtractor) -> Rows:  # fmt: skip
    gt = load_revisited_gnd(b.gnd)
    db = image_set_from_files([Path(b.images) / f"{n}{b.extension}" for n in gt.imlist])
    boxes = [g.get("bbx") if b.crop_queries else None for g in gt.gnd]
    queries = _crops([Path(b.images) / f"{n}{b.extension}" for n in gt.qimlist], boxes)
    digest = combine_digests(db.digest, queries.digest, sha256_bytes(Path(b.gnd).read_bytes()))
    rows: Rows = []
    for m in models:
        sims = extract(m.features, queries).global_ @ extract(m.features, db).global_.T
        rows += [_row(b, "retrieval", m, k, v, digest) for k, v in revisited_map(sims, gt.gnd).items()]
    return rows


def run_copy_detection(b: CopyDetectionBenchmark, models: list[EvalModel], cfg: EvaluateConfig,
                       extract: FeatureExtractor) -> Rows:  # fmt: skip
    truth = read_ground_truth(b.ground_truth, cfg.copy_detection.max_distractors)
    refs = read_image_set(b.references, b.format, need_labels=False)
    queries = image_set_from_files([Path(q) for q in truth["query"]])
    ref_pos = {image_id: i for i, image_id in enumerate(refs.ids)}
    pairs = []
    for qi, ref in enumerate(truth["reference"]):
        if ref is not None:
            rid = sha256_bytes(Path(ref).read_bytes())
            if rid not in ref_pos:
                raise ValueError(f"{b.name}: ground-truth reference {ref} is not among the references in {b.references}")
            pairs.append((qi, ref_pos[rid]))
    digest = combine_digests(refs.digest, queries.digest, hashlib.sha256(repr(pairs).encode()).hexdigest())
    rows: Rows = []
    for m in models:
        res = evaluate_copies(extract(m.features, queries).global_, extract(m.features, refs).global_, pairs,
                              cfg.copy_detection.k)  # fmt: skip
        detail = {"queries": len(queries), "copies": len(pairs), "references": len(refs)}
        rows += [_row(b, "copy_detection", m, "micro_ap", res.micro_ap, digest, **detail),
                 _row(b, "copy_detection", m, "recall_at_1", res.recall_at_1, digest, **detail)]  # fmt: skip
    return rows


def run_segmentation(b: SegmentationBenchmark, models: list[EvalModel], cfg: EvaluateConfig,
                     extract: FeatureExtractor) -> Rows:  # fmt: skip
    train, test = read_segmentation_split(b.root, b.train_split), read_segmentation_split(b.root, b.test_split)
    if b.reduce_zero_label:
        train.masks, test.masks = [reduce_zero_label(m) for m in train.masks], [reduce_zero_label(m) for m in test.masks]
    n_classes = b.n_classes or class_count(b.root, train.masks + test.masks)
    mask_digest = hashlib.sha256(b"".join(m.tobytes() for m in train.masks + test.masks)).hexdigest()
    digest = combine_digests(train.images.digest, test.images.digest, mask_digest)
    dc = cfg.dense
    rows: Rows = []
    for m in models:
        t0 = time.perf_counter()
        s = m.features.image_size
        ftr, fte = extract(m.features, train.images, patches=True), extract(m.features, test.images, patches=True)
        ytr = np.stack([mask_transform(x, s) for x in train.masks])  # N, s, s: the geometry of the images
        yte = np.stack([mask_transform(x, s) for x in test.masks])
        res = dense_linear_probe(ftr.patch, ytr, fte.patch, yte, n_classes, iterations=dc.iterations,
                                 batch_size=dc.batch_size, lr=dc.lr, weight_decay=dc.weight_decay)  # fmt: skip
        grid = tuple(int(v) for v in fte.patch.shape[1:3])
        detail = {"n_classes": n_classes, "seconds": round(time.perf_counter() - t0, 3), "iterations": dc.iterations,
                  "iou": [None if np.isnan(v) else round(float(v) * 100, 2) for v in res.iou],
                  **_dense_reference_points(ytr, yte, n_classes, grid)}  # fmt: skip
        rows += [_row(b, "dense_linear", m, "miou", res.miou, digest, **detail),
                 _row(b, "dense_linear", m, "pixel_accuracy", res.pixel_accuracy, digest, **detail)]  # fmt: skip
    return rows


def _dense_reference_points(ytr: np.ndarray, yte: np.ndarray, n_classes: int, grid: tuple[int, int]) -> dict[str, Any]:
    """What a dense probe's numbers mean here: the floor (the most frequent class everywhere) and the labelling of a
    perfect patch classifier at this patch grid (how much the grid's resolution allows)."""
    floor_miou, floor_acc = majority_baseline(ytr, yte, n_classes)
    return {"grid": list(grid), "label_size": list(yte.shape[1:]), "majority_miou": round(floor_miou, 2),
            "majority_pixel_accuracy": round(floor_acc, 2),
            "patch_majority_miou": round(mean_iou(patch_majority(yte, grid, n_classes), yte, n_classes)[0], 2)}


RUNNERS: dict[str, Callable[..., Rows]] = {
    "classification": run_classification, "retrieval": run_retrieval, "copy_detection": run_copy_detection,
    "segmentation": run_segmentation,
}  # fmt: skip


def run_benchmarks(benchmarks: list[Any], models: list[EvalModel], cfg: EvaluateConfig,
                   extract: FeatureExtractor) -> pd.DataFrame:  # fmt: skip
    rows: Rows = []
    with Progress("evaluate", len(benchmarks) * len(models), unit="model x benchmark", rate=False) as progress:
        for b in benchmarks:
            t0 = time.perf_counter()
            rows += RUNNERS[b.kind](b, _Ticking(models, progress), cfg, extract)
            logging.getLogger("lvd").info("evaluate: benchmark %s (%s, %d models) in %.1f s", b.name, b.kind,
                                          len(models), time.perf_counter() - t0)
    return pd.DataFrame(rows, columns=COLUMNS)


class _Ticking(list):
    """A benchmark's models: the evaluation's progress advances as a runner finishes each one (runners loop over
    their models once, sharing what the models have in common: the images, their digests)."""

    def __init__(self, models: list[EvalModel], progress: Progress):
        super().__init__(models)
        self.progress = progress

    def __iter__(self) -> Any:
        for m in super().__iter__():
            yield m
            self.progress.advance(1)


def evaluate(benchmarks: list[Any], models: list[EvalModel], cfg: EvaluateConfig, out_dir: Path, *,
             run_id: str, cache_dir: Path | None, table_root: Path | None = None) -> StageResult:  # fmt: skip
    """The evaluate stage's core: every benchmark x model, results written in ``out_dir`` (and appended to the
    results table under ``table_root``)."""
    extract = FeatureExtractor(cache_dir, cfg.batch_size, resolve(cfg.precision))
    t0 = time.perf_counter()
    results = run_benchmarks(benchmarks, models, cfg, extract)
    info = {m.name: {"role": m.role, "checkpoint": m.checkpoint, "fingerprint": m.features.fingerprint} for m in models}
    results = annotate(results, run_id, info, cfg, benchmarks)
    outputs = write_results(out_dir, results)
    if table_root is not None:
        append_to_table(table_root, results)
    return StageResult(
        counts={"results": len(results), "benchmarks": len(benchmarks), "models": len(models)},
        outputs=outputs,
        extra={"metrics": nested_metrics(results), "models": info, "seconds": round(time.perf_counter() - t0, 2),
               "feature_cache": {"hits": extract.hits, "misses": extract.misses, "dir": str(cache_dir)}},
    )
