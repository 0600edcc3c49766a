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


def test_extracting_a_set_holds_a_batch_of_its_images_not_the_set(tmp_path):
    """An evaluation split is read once for its ids and labels, then decoded a batch at a time: the Python heap's peak
    while extracting 32 and 128 photographs is the same (before, every file's bytes and every decoded image were
    held at once: an ImageNet-sized split needed tens of GB)."""
    import tracemalloc

    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n: int):
        root = tmp_path / f"n{n}"
        for i in range(n):
            (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (192, 256, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
        return root

    small, large = split(32), split(128)
    peaks = []
    for root in (small, large):
        tracemalloc.start()
        feats = FeatureExtractor(None, batch_size=8, precision="fp32")(PixelModel(8, 4), read_image_set(root))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert feats.cls.shape[0] == len(list(root.rglob("*.png")))
    # each image: 144 kB of PNG bytes and 144 kB decoded; the features are 192 floats
    assert peaks[1] < peaks[0] + 2_000_000, peaks
