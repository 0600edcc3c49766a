import numpy as np
import torch

from evaluation.features import FeatureExtractor, PixelModel, read_image_set, wrap
from infra.features import eval_transform
from training.registry import build_backbone


def _pico():
    torch.manual_seed(0)
    return build_backbone("vit_pico", patch_size=4, img_size=16).eval()


def test_token_features_are_the_reference_outputs(toy_classification):
    model = _pico()
    images = read_image_set(toy_classification[1])
    feats = FeatureExtractor(None, batch_size=5, precision="fp32")(wrap(model, "pico", "test", 16), images, patches=True)
    x = torch.stack([eval_transform(im, 16) for im in images.load()])
    with torch.no_grad():
        ref = model.forward_features(x)
        layers = model.get_intermediate_layers(x, n=4, return_class_token=True, norm=True)
        torch.testing.assert_close(torch.from_numpy(feats.cls[:, -1]), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(feats.cls), torch.stack([c for _, c in layers], 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(feats.patch_mean), ref["x_norm_patchtokens"].mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(feats.patch), ref["x_norm_patchtokens"].reshape(12, 4, 4, 96), rtol=1e-5,
                               atol=1e-5)
    assert feats.cls.shape == (12, 4, 96)
    np.testing.assert_allclose(np.linalg.norm(feats.global_, axis=1), 1.0, rtol=1e-6)


def test_features_are_cached_by_model_and_dataset(toy_classification, tmp_path):
    train, test = read_image_set(toy_classification[0]), read_image_set(toy_classification[1])
    extract = FeatureExtractor(tmp_path, precision="fp32")
    pixels = PixelModel(16, 4)
    first = extract(pixels, test)
    again = extract(pixels, test)
    assert (extract.misses, extract.hits) == (1, 1)
    np.testing.assert_array_equal(first.cls, again.cls)
    extract(pixels, train)  # another dataset
    extract(PixelModel(8, 4), test)  # another transform
    extract(pixels, test, patches=True)  # patch tokens asked for
    relabelled = read_image_set(toy_classification[1])
    relabelled.labels = (relabelled.labels + 1) % 3  # same images, other labels: the same features
    extract(pixels, relabelled)
    assert relabelled.digest != test.digest
    assert (extract.misses, extract.hits) == (4, 2)
    assert len(list(tmp_path.glob("*/*/meta.json"))) == 4
