"""Face detection and blurring (paper §A.3 post-processing): detected boxes (with a margin) are blurred and the
image re-encoded. This stage writes the sanitized pool shards that every later stage reads."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image, ImageFilter

from infra.images import decode, encode
from infra.config.ingest import FacesConfig
from infra.lineage import LedgerWriter
from infra.shards import Shard, ShardWriter, iter_shard_images, list_shards
from infra.stage import ShardTracker, StageResult, add_counts, summarize

Box = tuple[int, int, int, int]  # x, y, w, h


class FaceDetector(Protocol):
    name: str

    def detect(self, img: Image.Image) -> list[Box]: ...


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (ships with opencv-python-headless)."""

    def __init__(self, cfg: FacesConfig):
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise RuntimeError(f"could not load the Haar cascade at {path}")
        self.cfg = cfg
        self.name = f"opencv-haar:{path.name}"

    def detect(self, img: Image.Image) -> list[Box]:
        gray = np.asarray(img.convert("L"))
        boxes = self._cascade.detectMultiScale(
            gray, scaleFactor=self.cfg.scale_factor, minNeighbors=self.cfg.min_neighbors,
            minSize=(self.cfg.min_size, self.cfg.min_size),
        )  # fmt: skip
        return sorted(tuple(int(v) for v in b) for b in boxes)  # type: ignore[misc]


def build_detector(cfg: FacesConfig) -> FaceDetector:
    if cfg.backend == "haar":
        return HaarDetector(cfg)
    raise ValueError(f"unknown face detector {cfg.backend!r}")


def expand(box: Box, margin: float, size: tuple[int, int]) -> Box:
    x, y, w, h = box
    dx, dy = round(w * margin), round(h * margin)
    x0, y0 = max(0, x - dx), max(0, y - dy)
    x1, y1 = min(size[0], x + w + dx), min(size[1], y + h + dy)
    return x0, y0, x1 - x0, y1 - y0


def blur_boxes(img: Image.Image, boxes: list[Box], mode: str) -> Image.Image:
    """Blur each box strongly enough that the face is no longer recognisable (nor detected)."""
    out = img.copy()
    for x, y, w, h in boxes:
        region = out.crop((x, y, x + w, y + h))
        if mode == "pixelate":
            cells = max(2, min(w, h) // 8)
            region = region.resize((cells, cells), Image.BILINEAR).resize((w, h), Image.NEAREST)
        else:
            region = region.filter(ImageFilter.GaussianBlur(radius=max(2.0, min(w, h) / 6)))
        out.paste(region, (x, y))
    return out


def blur_shard(shard: Shard, skip: set[str], detector: FaceDetector, cfg: FacesConfig, stage_dir: Path) -> dict[str, int]:
    ledger = LedgerWriter("faces")
    n_images = n_blurred = 0
    with ShardWriter(stage_dir / "shards", shard.name) as writer:
        for meta, data in iter_shard_images(shard, skip):
            ids = {"row_id": meta["row_id"], "image_id": meta["image_id"]}
            try:
                img = decode(data)
            except Exception as err:  # noqa: BLE001 - recorded, the run goes on
                ledger.drop("decode_error", **ids, detail={"error": str(err)})
                continue
            boxes = [expand(b, cfg.margin, img.size) for b in detector.detect(img)]
            columns = {k: meta[k] for k in ("row_id", "url", "source", "width", "height") if k in meta}
            if boxes:
                data = encode(blur_boxes(img, boxes, cfg.blur), meta["ext"], cfg.encode_quality)
                n_blurred += 1
            ledger.info("faces", **ids, detail={"n_faces": len(boxes), "boxes": boxes, "detector": detector.name, "blur": cfg.blur})
            writer.add(meta["image_id"], data, meta["ext"], **columns, n_faces=len(boxes))
            n_images += 1
    ledger.write(stage_dir / "ledger" / f"{shard.name}.parquet")
    drops = {f"drop:{k}": v for k, v in ledger.counts()["drop"].items()}
    return {"kept": n_images, "blurred": n_blurred, **drops}


def blur_faces(shards: list[Shard], skip: set[str], stage_dir: Path, cfg: FacesConfig, tracker: ShardTracker) -> StageResult:
    detector: list[FaceDetector] = []  # built on first use

    def work(shard: Shard) -> dict[str, int]:
        if not detector:
            detector.append(build_detector(cfg))
        return blur_shard(shard, skip, detector[0], cfg, stage_dir)

    totals: dict[str, int] = {}
    for shard in shards:
        add_counts(totals, tracker.run(shard.name, lambda shard=shard: work(shard)))
    outputs = [p for s in list_shards(stage_dir / "shards") for p in (s.tar, s.table)]
    outputs += sorted((stage_dir / "ledger").glob("*.parquet"))
    return StageResult(counts=summarize(totals), outputs=outputs, extra={"detector": cfg.backend, "blur": cfg.blur, "margin": cfg.margin})
