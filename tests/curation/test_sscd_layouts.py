"""Published SSCD ONNX layouts: uint8 NHWC with the normalisation inside the graph, and float NCHW, read from the
model's input signature, give the same descriptors (tiny graphs built with onnx.helper, tests/curation/sscd_onnx.py)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from curation.descriptors import build_descriptor, describe
from curation.models.sscd import OnnxModel, load_sscd, to_pixels
from infra.config.curation import DescriptorConfig

from . import sscd_onnx

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]


@pytest.fixture(scope="module")
def photos():
    out = []
    for i, name in enumerate(PHOTOS):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        out.append(img.resize((60 + 9 * i, 50 + 5 * i)))
    return out


def _cfg(path, **kw):
    return DescriptorConfig(path=path, dims=16, image_size=32, batch_size=2, precision="fp32", **kw)


def test_both_layouts_load_and_give_the_same_descriptors(tmp_path, photos):
    nchw = sscd_onnx.save(tmp_path / "float.onnx", "float_nchw")
    nhwc = sscd_onnx.save(tmp_path / "uint8.onnx", "uint8_nhwc")
    assert load_sscd(nchw).input.layout == "float_nchw"
    assert load_sscd(nhwc).input.layout == "uint8_nhwc"
    a = describe(photos, build_descriptor(_cfg(nchw)), _cfg(nchw))
    b = describe(photos, build_descriptor(_cfg(nhwc)), _cfg(nhwc))
    d = build_descriptor(_cfg(nchw))
    ref = sscd_onnx.reference(torch.stack([d.preprocess(im) for im in photos]).numpy())
    np.testing.assert_allclose(a[:, 0], ref, atol=1e-5)
    np.testing.assert_allclose(b[:, 0], ref, atol=1e-5)
    assert np.abs(ref @ ref.T - np.eye(len(photos))).max() > 0.01  # the photographs are told apart


@pytest.mark.parametrize("resize", ["square", "short_side"])
def test_free_height_and_width_take_any_shape(tmp_path, photos, resize):
    nhwc = sscd_onnx.save(tmp_path / "uint8.onnx", "uint8_nhwc")
    cfg = _cfg(nhwc, resize=resize, views=[1.0, 0.7], flip=True)
    ref = describe(photos, build_descriptor(_cfg(sscd_onnx.save(tmp_path / "f.onnx", "float_nchw"), resize=resize,
                                                 views=[1.0, 0.7], flip=True)), cfg)  # fmt: skip
    np.testing.assert_allclose(describe(photos, build_descriptor(cfg), cfg), ref, atol=1e-5)


def test_pixels_round_trip_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    from infra.features import IMAGENET_MEAN, IMAGENET_STD

    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]  # fmt: skip
    np.testing.assert_array_equal(to_pixels(x), pixels)


def test_fixed_size_is_read_and_enforced(tmp_path, photos):
    fixed = sscd_onnx.save(tmp_path / "fixed.onnx", "uint8_nhwc", hw=(32, 32))
    model = load_sscd(fixed)
    assert (model.input.height, model.input.width) == (32, 32)
    assert describe(photos, build_descriptor(_cfg(fixed)), _cfg(fixed)).shape == (4, 1, 16)
    with pytest.raises(ValueError, match=r"takes 32x32 images only; set dedup.descriptor.resize=square and "
                                         r"dedup.descriptor.image_size=32"):  # fmt: skip
        build_descriptor(_cfg(fixed, resize="short_side"))
    with pytest.raises(ValueError, match="image_size=32"):
        build_descriptor(DescriptorConfig(path=fixed, dims=16, image_size=64))


def test_ambiguous_signature_needs_the_input_option(tmp_path, photos):
    path = sscd_onnx.save(tmp_path / "sym.onnx", "float_nchw", input_shape=["b", "c", "h", "w"])
    with pytest.raises(ValueError, match=r"channel position is ambiguous; set dedup.descriptor.input to float_nchw or "
                                         r"float_nhwc"):  # fmt: skip
        load_sscd(path)
    cfg = _cfg(path, input="float_nchw")
    ref = describe(photos, build_descriptor(_cfg(sscd_onnx.save(tmp_path / "f.onnx", "float_nchw"))), cfg)
    np.testing.assert_allclose(describe(photos, build_descriptor(cfg), cfg), ref, atol=1e-6)


def test_an_input_option_that_contradicts_the_model_is_refused(tmp_path):
    path = sscd_onnx.save(tmp_path / "uint8.onnx", "uint8_nhwc")
    with pytest.raises(ValueError, match=r"dedup.descriptor.input=float_nchw, but the model's input 'images' is "
                                         r"tensor\(uint8\)"):  # fmt: skip
        load_sscd(path, layout="float_nchw")


def test_threads_reach_the_onnx_session(tmp_path):
    path = sscd_onnx.save(tmp_path / "f.onnx", "float_nchw")
    model = build_descriptor(_cfg(path, threads=1)).model
    assert isinstance(model, OnnxModel)
    assert model.session.get_session_options().intra_op_num_threads == 1
    assert model.dims == 16
