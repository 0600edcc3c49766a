"""SSCD: the in-project model and the loaders of each official file format give the same descriptors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from curation.descriptors import SSCDDescriptor
from curation.models.sscd import (
    GeM,
    SSCDModel,
    detect_format,
    export_onnx,
    export_torchscript,
    export_torchvision,
    load_sscd,
    sscd_state_dict,
)

SIZE = 64


def _model(arch: str = "resnet18", dims: int = 32) -> SSCDModel:
    torch.manual_seed(0)
    model = SSCDModel(arch, dims).eval()
    with torch.no_grad():  # zero_init_residual leaves the last BN of each block at 0: randomise so blocks matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.uniform_(-0.1, 0.1)
    return model


def _batch() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_gem_matches_its_definition() -> None:
    x = torch.rand(2, 4, 5, 6) + 0.1
    expected = (x.pow(3).sum((2, 3)) / 30).pow(1 / 3)
    torch.testing.assert_close(GeM(3)(x), expected)


def test_model_layout_matches_the_release() -> None:
    model = SSCDModel()  # ResNet-50, 512-d: the released sscd_disc_mixup architecture
    keys = model.state_dict().keys()
    assert "backbone.fc.weight" in keys and model.state_dict()["backbone.fc.weight"].shape == (512, 2048)
    assert isinstance(model.backbone.avgpool, GeM) and model.backbone.avgpool.p == 3.0
    assert len(keys) == 320  # torchvision resnet50 state dict, nothing added by GeM or L2Norm
    out = model.eval()(torch.randn(2, 3, SIZE, SIZE))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_torchvision_state_dict_roundtrip(tmp_path) -> None:
    model = _model()
    path = export_torchvision(model, tmp_path / "tiny.torchvision.pt")
    loaded = load_sscd(path, arch="resnet18", dims=32)
    x = _batch()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_state_dict_without_prefix_and_in_a_lightning_wrapper(tmp_path) -> None:
    model = _model()
    bare = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    torch.save({"state_dict": {f"model.{k}": v for k, v in bare.items()}}, tmp_path / "x.pth")
    assert sscd_state_dict(torch.load(tmp_path / "x.pth", weights_only=True)).keys() == model.state_dict().keys()
    loaded = load_sscd(tmp_path / "x.pth", arch="resnet18", dims=32)
    torch.testing.assert_close(loaded(_batch()), model(_batch()), rtol=0, atol=0)


def test_torchscript_roundtrip(tmp_path) -> None:
    model = _model()
    path = export_torchscript(model, tmp_path / "tiny.torchscript.pt")
    loaded = load_sscd(path)
    assert isinstance(loaded, torch.jit.ScriptModule)
    torch.testing.assert_close(loaded(_batch()), model(_batch()), rtol=1e-6, atol=1e-6)


def test_onnx_roundtrip(tmp_path) -> None:
    pytest.importorskip("onnx", reason="exporting ONNX needs the `onnx` package (pinned in pyproject.toml)")
    model = _model()
    path = export_onnx(model, tmp_path / "tiny.onnx", image_size=SIZE)
    loaded = load_sscd(path)
    x = _batch()
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    other = torch.randn(2, 3, SIZE + 32, SIZE, generator=torch.Generator().manual_seed(2))  # dynamic H, W, batch
    torch.testing.assert_close(loaded(other), model(other), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resnet50_formats_agree(tmp_path) -> None:
    """The full released architecture (ResNet-50, 512-d) through all three formats."""
    model = _model("resnet50", 512)
    x = _batch()[:2]
    ref = model(x)
    paths = [export_torchvision(model, tmp_path / "m.torchvision.pt"), export_torchscript(model, tmp_path / "m.torchscript.pt")]
    try:
        import onnx  # noqa: F401

        paths.append(export_onnx(model, tmp_path / "m.onnx", image_size=SIZE))
    except ImportError:
        pass
    for path in paths:
        torch.testing.assert_close(load_sscd(path)(x), ref, rtol=1e-4, atol=1e-5)


def test_format_detection_and_missing_file(tmp_path) -> None:
    assert detect_format("a/sscd_disc_mixup.torchscript.pt") == "torchscript"
    assert detect_format("sscd_disc_mixup.torchvision.pt") == "torchvision"
    assert detect_format("m.onnx") == "onnx"
    with pytest.raises(FileNotFoundError, match="lvd models fetch"):
        load_sscd(tmp_path / "absent.torchscript.pt")


def test_descriptor_preprocessing_is_sscds() -> None:
    """Square: squash to 320; short side: 288 with the aspect kept (torchvision Resize(288) truncation)."""
    d = SSCDDescriptor(torch.nn.Identity(), "id", 320, "square")
    img = Image.fromarray(np.full((100, 150, 3), 255, np.uint8))
    x = d.preprocess(img)
    assert x.shape == (3, 320, 320)
    torch.testing.assert_close(x[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    assert SSCDDescriptor(torch.nn.Identity(), "id", 288, "short_side").preprocess(img).shape == (3, 288, 432)
    assert SSCDDescriptor(torch.nn.Identity(), "id", 288, "short_side").preprocess(img.resize((97, 130))).shape == (3, 385, 288)


def test_descriptor_batches_by_shape_and_matches_the_model(tmp_path) -> None:
    model = _model()
    d = SSCDDescriptor(model, "tiny", SIZE, "short_side", batch_size=2, precision="fp32")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 60), (50, 50), (40, 60)]]
    out = d(images)
    for i, im in enumerate(images):
        ref = model(d.preprocess(im)[None]).detach().numpy()[0]
        np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-6)
