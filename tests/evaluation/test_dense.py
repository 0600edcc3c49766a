import numpy as np
import pytest

from evaluation.dense import dense_linear_probe, mask_transform, mean_iou, reduce_zero_label


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
