import json

import numpy as np
import pytest
from PIL import Image

from evaluation.dense import (
    dense_linear_probe,
    majority_baseline,
    mask_transform,
    mean_iou,
    patch_majority,
    reduce_zero_label,
)
from evaluation.features import FeatureExtractor, PixelModel
from evaluation.suite import EvalModel, run_segmentation
from infra.config.evaluate import EvaluateConfig, SegmentationBenchmark


def test_mean_iou_by_hand():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    # ignored pixel (1, 2) left out. class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 3, FP 1 -> 3/4;
    # class 2: TP 1, FN 1 -> 1/2; class 3 absent from both -> NaN, not averaged. mIoU = 19/36.
    miou, iou = mean_iou(pred, target, 4)
    assert miou == pytest.approx(19 / 36 * 100, abs=1e-12)
    np.testing.assert_allclose(iou[:3], [1 / 3, 3 / 4, 1 / 2], rtol=0, atol=1e-15)
    assert np.isnan(iou[3])


def test_dense_probe_learns_a_separable_patch_labelling():
    rng = np.random.default_rng(0)
    n, h, d, scale = 24, 4, 8, 4
    # Left and right halves of each image get a class each: bilinear upsampling of the logits then only mixes two
    # regions at a boundary, with the own patch weighing 5/8 (at corners of three regions it could lose).
    halves = rng.integers(0, 3, (n, 2))
    labels = np.repeat(np.repeat(halves[:, None, :], h, axis=1), h // 2, axis=2)  # n, h, h
    tokens = rng.normal(scale=0.1, size=(n, h, h, d)).astype(np.float32)
    tokens[..., :3] += np.eye(3, dtype=np.float32)[labels] * 3.0  # linearly separable tokens
    masks = np.kron(labels, np.ones((scale, scale), int)).astype(np.uint8)  # each patch covers 4x4 pixels
    masks[:, 0, 0] = 255  # an ignored pixel
    res = dense_linear_probe(tokens[:16], masks[:16], tokens[16:], masks[16:], 3, iterations=150, batch_size=8, lr=1e-2)
    assert res.miou == 100.0 and res.pixel_accuracy == 100.0
    np.testing.assert_array_equal(res.iou, [1.0, 1.0, 1.0])


def test_mask_transform_matches_the_image_geometry():
    mask = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4)  # H 6, W 4: shorter side 4 -> 8, then centre crop 8x8
    out = mask_transform(mask, 8)
    assert out.shape == (8, 8)
    np.testing.assert_array_equal(out[:, ::2], mask[1:5].repeat(2, axis=0))  # rows 1..4 survive the crop


def test_reduce_zero_label_is_the_ade20k_convention():
    np.testing.assert_array_equal(reduce_zero_label(np.array([[0, 1, 2], [150, 255, 0]], np.uint8)),
                                  [[255, 0, 1], [149, 255, 255]])


# Four 2x2 patch cells; majorities 0, 1, 2 and (three ignored pixels) 1.
CELLS = np.array([[0, 0, 1, 1], [0, 1, 1, 2], [2, 2, 255, 255], [2, 0, 255, 1]], np.uint8)
# Against CELLS: class 0 TP 3 of 4, predicted 4 -> 3/5; class 1 TP 4 of 5, predicted 5 -> 4/6; class 2 TP 3 of 4,
# predicted 4 -> 3/5. mIoU = (3/5 + 2/3 + 3/5) / 3 = 28/45.
PATCH_MIOU = 28 / 45 * 100


def test_patch_majority_by_hand():
    out = patch_majority(CELLS[None], (2, 2), 3)
    np.testing.assert_array_equal(out[0], [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 1, 1]])
    assert mean_iou(out, CELLS[None], 3)[0] == pytest.approx(PATCH_MIOU, abs=1e-12)


def test_majority_baseline_by_hand():
    train = np.array([[[0, 0, 1], [255, 2, 0]]], np.uint8)  # class 0 most frequent (3 of 5 labelled pixels)
    miou, acc = majority_baseline(train, CELLS[None], 3)
    # all 13 labelled test pixels -> 0: IoU 4/13 for class 0, 0 for classes 1 and 2
    assert miou == pytest.approx(4 / 39 * 100, abs=1e-12) and acc == pytest.approx(4 / 13 * 100, abs=1e-12)


def test_run_segmentation_records_what_the_numbers_mean(tmp_path):
    """The segmentation runner end to end (folders, mask geometry, raw-pixel patch tokens), with the reference points
    the report explains the mIoU by: the floor, the patch grid and the perfect patch classifier at that grid."""
    rng = np.random.default_rng(0)
    test_mask = np.kron(CELLS, np.ones((2, 2), np.uint8))  # 8 x 8 px: each 2x2 cell of CELLS is now a 4x4 patch
    train_masks = [np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8)]
    train_masks[1][0] = 2  # train pixels: 64 of class 0, 56 of class 1, 8 of class 2 -> class 0 is the majority
    for split, masks in (("train", train_masks), ("test", [test_mask])):
        for d in ("images", "annotations"):
            (tmp_path / d / split).mkdir(parents=True)
        for i, m in enumerate(masks):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / split / f"{i}.png")
            Image.fromarray(m).save(tmp_path / "annotations" / split / f"{i}.png")
    cfg = EvaluateConfig(dense={"iterations": 3, "batch_size": 2})
    bench, model = SegmentationBenchmark(name="cells", root=tmp_path), EvalModel(PixelModel(8, 4), "baseline")
    rows = run_segmentation(bench, [model], cfg, FeatureExtractor(None, precision="fp32"))
    assert [(r["protocol"], r["metric"]) for r in rows] == [("dense_linear", m) for m in ("miou", "pixel_accuracy")]
    detail = json.loads(rows[0]["detail"])
    assert (detail["n_classes"], detail["iterations"], detail["grid"], detail["label_size"]) == (3, 3, [2, 2], [8, 8])
    floor = (detail["majority_miou"], detail["majority_pixel_accuracy"])
    assert floor == (round(4 / 39 * 100, 2), round(4 / 13 * 100, 2))
    assert detail["patch_majority_miou"] == round(PATCH_MIOU, 2)
