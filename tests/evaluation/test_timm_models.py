"""timm models with local weights (no hub): a checkpoint saved with its classifier head loads without it."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from evaluation.features import FeatureExtractor, GlobalBackbone, TokenBackbone, read_image_set
from flows.evaluate import parse_model_spec
from flows.models import feature_model


@pytest.mark.parametrize(("arch", "wrapper", "dims"), [("resnet10t", GlobalBackbone, (1, 512)),
                                                       ("vit_tiny_patch16_224", TokenBackbone, (4, 192))])
def test_timm_checkpoint_with_head_evaluates(arch, wrapper, dims, toy_classification, tmp_path):
    torch.manual_seed(0)
    dynamic = {"dynamic_img_size": True} if arch.startswith("vit") else {}
    trained = timm.create_model(arch, pretrained=False, num_classes=7, **dynamic)  # a fine-tuned model, with its head
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "w.safetensors"))
    entry = parse_model_spec(f"t={tmp_path / 'w.safetensors'},kind=timm,arch={arch},image_size=32")
    model = feature_model(entry.backbone, entry.name)
    assert isinstance(model, wrapper)
    feats = FeatureExtractor(None, precision="fp32")(model, read_image_set(toy_classification[1]), patches=True)
    assert feats.cls.shape == (12, *dims)
    # the backbone weights are the checkpoint's: the pooled feature equals the trained model's pre-logits
    x = torch.stack([torch.zeros(3, 32, 32)])
    with torch.no_grad():
        ref = trained.eval().forward_head(trained.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.model(x), ref, rtol=1e-5, atol=1e-5)
