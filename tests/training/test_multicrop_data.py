"""Data: decoding (grayscale to RGB), sources (folders, corpus shards), multi-crop, batched photometric ops
against torchvision, and the deterministic stream."""

from __future__ import annotations

import io
import math
import tarfile
from functools import partial

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import png_bytes, write_images
from PIL import Image
from torch.testing import assert_close

from infra.config.train import TrainConfig
from infra.shards import ShardWriter, UnsafeArchiveError
from tests.tars import tar_with
from training.data import (
    BatchStream,
    FolderSource,
    MaskingGenerator,
    MultiCropAugmentation,
    TarShardSource,
    build_source,
    collate_data_and_cast,
    decode_rgb,
)
from training.data.augmentations import BLUR_PROBABILITIES, IMAGENET_MEAN, IMAGENET_STD
from training.data.photometric import PhotometricParams, _apply, apply_photometric, is_grey
from training.schedules import derive


def test_decode_grayscale_palette_alpha_and_broken():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L")
    rgb = np.asarray(decode_rgb(png_bytes(gray)))
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == np.asarray(gray)).all() and (rgb[..., 1] == rgb[..., 2]).all()
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(decode_rgb(png_bytes(rgba))).min() == 255  # fully transparent -> white, as ingest composites it
    assert decode_rgb(png_bytes(gray.convert("P"))).mode == "RGB"
    assert decode_rgb(b"not an image") is None


def test_folder_source_is_recursive_and_filters(tmp_path):
    write_images(tmp_path, 5)
    Image.new("RGB", (9, 9)).save(tmp_path / "part0" / "UPPER.JPEG")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / ".hidden" / "skip.png")
    src = build_source(tmp_path)
    assert isinstance(src, FolderSource) and len(src) == 6
    assert sorted(p.name for p in src.files)[-1] == "img0004.png"


def test_tar_shard_source_reads_members(tmp_path):
    imgs = [Image.fromarray(np.full((6, 6), i * 20, np.uint8), "L") for i in range(5)]
    paths = []
    for s in range(2):
        with ShardWriter(tmp_path, f"{s:05d}") as w:
            for i in range(s, 5, 2):
                w.add(f"id{i}", png_bytes(imgs[i]), "png")
        paths.append(w.tar_path)
    src = build_source(paths)
    assert isinstance(src, TarShardSource) and len(src) == 5
    assert [src.read(k) for k in range(5)] == [png_bytes(imgs[i]) for i in (0, 2, 4, 1, 3)]
    assert isinstance(build_source(tmp_path), TarShardSource)  # a folder of shards


def test_tar_with_link_is_refused(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("x.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(UnsafeArchiveError):
        TarShardSource.from_tars([path])


def test_tar_source_reads_nested_names_and_skips_directories(tmp_path):
    """Users' own tars (ImageNet-style class folders inside the tar) are indexed as they are: nothing is extracted."""
    a, b = png_bytes(Image.new("L", (5, 5))), png_bytes(Image.new("L", (6, 6), 9))
    path = tmp_path / "own.tar"
    tar_with(path, [("train", None), ("train/n01", None), ("train/n01/x.JPEG", a), ("train/n01/x.txt", b"cls"),
                     ("train/n02/y.png", b)])
    src = TarShardSource.from_tars([path])
    assert [src.name(k) for k in range(len(src))] == ["own.tar:train/n01/x.JPEG", "own.tar:train/n02/y.png"]
    assert [src.read(k) for k in range(2)] == [a, b]


@pytest.mark.parametrize("name", ["/abs.png", "a/../b.png"])
def test_tar_source_refuses_unsafe_names(tmp_path, name):
    tar_with(tmp_path / "bad.tar", [(name, b"x")])
    with pytest.raises(UnsafeArchiveError, match="unsafe tar member name"):
        TarShardSource.from_tars([tmp_path / "bad.tar"])


def test_tar_source_names_compressed_and_truncated_tars(tmp_path):
    data = png_bytes(Image.new("L", (5, 5)))
    with tarfile.open(tmp_path / "c.tar", "w:gz") as tar:
        info = tarfile.TarInfo("x.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"c\.tar: not a readable uncompressed tar .*gunzip"):
        TarShardSource.from_tars([tmp_path / "c.tar"])
    tar_with(tmp_path / "t.tar", [("x.png", data * 40)])
    whole = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(whole[:1024])  # header + the first bytes of the member's data
    with pytest.raises(ValueError, match=r"t\.tar: .*'x\.png' runs past the end of the file"):
        TarShardSource.from_tars([tmp_path / "t.tar"])


@pytest.mark.parametrize("impl", ["batched", "pil"])
def test_multicrop_shapes_and_determinism(impl):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30), np.uint8), "L").convert("RGB")
    aug = MultiCropAugmentation(local_crops_number=3, global_crops_size=16, local_crops_size=8, impl=impl)
    a, b, c = aug(img, 5), aug(img, 5), aug(img, 6)
    assert [t.shape for t in a["global_crops"]] == [(3, 16, 16)] * 2
    assert [t.shape for t in a["local_crops"]] == [(3, 8, 8)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a["local_crops"], b["local_crops"], strict=True))
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def test_default_multicrop_is_2x224_plus_8x98_at_patch_14():
    """The paper's views (issue: 2 global 224 + 8 local 98); the reference code's ssl_default_config has 96 / 16."""
    cfg = TrainConfig()
    c = cfg.crops
    assert (c.global_crops_size, c.local_crops_number, c.local_crops_size, cfg.student.patch_size) == (224, 8, 98, 14)
    d = derive(cfg, 1)
    assert (d.global_patches, d.local_patches) == (16 * 16, 7 * 7)
    aug = MultiCropAugmentation()
    assert (aug.global_size, aug.local_size, aug.local_crops_number) == (224, 98, 8)


def test_blur_modes():
    assert BLUR_PROBABILITIES == {"reference": (0.0, 0.9, 0.5), "paper": (1.0, 0.1, 0.5), "none": (0.0, 0.0, 0.0)}
    for mode, (p1, p2, p_local) in BLUR_PROBABILITIES.items():
        aug = MultiCropAugmentation(blur_mode=mode, impl="pil")
        assert (aug.global_transfo1.transforms[1].p, aug.global_transfo2.transforms[1].p,
                aug.local_transfo.transforms[1].p) == (p1, p2, p_local)


@pytest.mark.parametrize("mode", ["reference", "paper", "none"])
def test_batched_path_blurs_each_view_with_the_mode_probabilities(mode):
    """The default (batched) augmentation: `finish` applies exactly the decisions of `photometric_params`, whose
    blur rates over 20,000 seeded draws per view are the mode's probabilities (exactly, where they are 0 or 1)."""
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=16, local_crops_size=8, blur_mode=mode)
    assert aug.impl == "batched"
    g = torch.Generator().manual_seed(0)
    crops = {"collated_global_crops": torch.randint(0, 256, (2 * 6, 3, 16, 16), dtype=torch.uint8, generator=g),
             "collated_local_crops": torch.randint(0, 256, (2 * 6, 3, 8, 8), dtype=torch.uint8, generator=g)}
    got = aug.finish(dict(crops), torch.Generator().manual_seed(5))
    p1, p2, p_local = aug.photometric_params(6, 12, torch.Generator().manual_seed(5))
    glob = crops["collated_global_crops"].float() / 255
    want = torch.cat([apply_photometric(glob[:6], p1), apply_photometric(glob[6:], p2)])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert_close(got["collated_global_crops"], (want - mean) / std, rtol=0, atol=0)
    local = apply_photometric(crops["collated_local_crops"].float() / 255, p_local)
    assert_close(got["collated_local_crops"], (local - mean) / std, rtol=0, atol=0)

    n = 20_000
    views = aug.photometric_params(n, n, torch.Generator().manual_seed(0))
    for name, params, p, solarize in zip(("global 1", "global 2", "local"), views, BLUR_PROBABILITIES[mode],
                                         (0.0, 0.2, 0.0), strict=True):
        for decision, prob in ((params.blur, p), (params.solarize, solarize)):
            rate = decision.double().mean().item()
            if prob in (0.0, 1.0):
                assert rate == prob, (name, rate)
            else:  # 4 standard deviations of a binomial rate: 0.008 at p = 0.9, 0.014 at p = 0.5
                assert abs(rate - prob) < 4 * math.sqrt(prob * (1 - prob) / n), (name, rate, prob)


def _torchvision_reference(x: torch.Tensor, p: PhotometricParams, i: int) -> torch.Tensor:
    """The reference pipeline's ops, one image at a time, with the same random parameters."""
    y = x[i]
    if p.jitter[i]:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op in p.order[i].tolist():
            y = ops[op](y, float(p.factors[i, op]))
    if p.gray[i]:
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    if p.blur[i]:
        y = TF.gaussian_blur(y, kernel_size=9, sigma=float(p.sigma[i]))
    if p.solarize[i]:
        y = TF.solarize(y, 128 / 255)
    return y


def test_batched_photometric_equals_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 12, 12, generator=g)
    params = PhotometricParams.sample(40, blur_p=0.5, solarize_p=0.3, g=g, jitter_p=0.8, gray_p=0.3)
    got = apply_photometric(x, params)
    want = torch.stack([_torchvision_reference(x, params, i) for i in range(40)])
    assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert params.jitter.any() and params.gray.any() and params.blur.any() and params.solarize.any()


@pytest.mark.parametrize("grey_share", [0.0, 0.5, 1.0])
def test_grey_crops_are_computed_on_one_channel_with_the_same_values(grey_share):
    """Crops with three equal channels run every op on one channel and are replicated: bit for bit the three-channel
    computation (`_apply` on all three), in batches of grey, colour and mixed crops."""
    g = torch.Generator().manual_seed(1)
    n = 48
    x = torch.rand(n, 3, 12, 12, generator=g)
    n_grey = int(n * grey_share)
    x[:n_grey] = x[:n_grey, :1].expand(-1, 3, -1, -1)
    x = x[torch.randperm(n, generator=g)]
    assert int(is_grey(x).sum()) == n_grey
    params = PhotometricParams.sample(n, blur_p=0.5, solarize_p=0.3, g=g, jitter_p=0.9, gray_p=0.3)
    assert_close(apply_photometric(x, params), _apply(x, params), rtol=0, atol=0)
    if n_grey:  # and the reference's per-image ops on the grey crops
        grey = is_grey(x).nonzero().flatten()
        want = torch.stack([_torchvision_reference(x, params, int(i)) for i in grey])
        assert_close(apply_photometric(x, params)[grey], want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["batched", "pil"])
def test_greyscale_images_give_the_views_of_their_rgb_conversion(impl):
    """A greyscale image is decoded as one channel ("L") for the batched augmentation, cropped and resized on that
    channel: its views equal those of its RGB conversion exactly."""
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (37, 29), dtype=np.uint8), "L")
    data = png_bytes(grey)
    assert decode_rgb(data, keep_grey=True).mode == "L" and decode_rgb(data).mode == "RGB"
    aug = MultiCropAugmentation(local_crops_number=3, global_crops_size=24, local_crops_size=12, impl=impl)
    for seed in range(8):
        got, want = aug(decode_rgb(data, keep_grey=True), seed), aug(decode_rgb(data), seed)
        for key in ("global_crops", "local_crops"):
            for a, b in zip(got[key], want[key], strict=True):
                assert a.shape == b.shape and torch.equal(a, b) and a.is_contiguous()


def test_stream_of_greyscale_images_equals_the_three_channel_stream(tmp_path):
    """End to end (decode, crops, jitter, masks, collate): a folder of greyscale images gives the same batches with
    the one-channel path as with every image decoded to RGB and every op on three channels."""
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 23), dtype=np.uint8), "L").save(tmp_path / f"{i}.png")
    grey, rgb = _stream(build_source(tmp_path)), _stream(build_source(tmp_path))
    rgb.transform.grey_path = False
    assert grey.transform.grey_path
    for step in range(3):
        a, b = grey.batch(step), rgb.batch(step)
        for key in ("collated_global_crops", "collated_local_crops", "collated_masks"):
            assert a[key].is_contiguous() and torch.equal(a[key], b[key]), key


def _stream(source, **kw):
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=16, local_crops_size=8)
    collate = partial(collate_data_and_cast, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, n_tokens=16,
                      mask_generator=MaskingGenerator(4, max_num_patches=8))
    return BatchStream(source, aug, collate, batch_size=4, seed=3, **kw)


def test_stream_is_a_function_of_step_and_rank(image_folder):
    src = build_source(image_folder)
    it = iter(_stream(src))
    batches = [next(it) for _ in range(4)]
    resumed = _stream(src, start_step=3).batch(3)
    for key in ("collated_global_crops", "collated_local_crops", "collated_masks", "positions"):
        assert torch.equal(batches[3][key], resumed[key])
    workers = torch.utils.data.DataLoader(_stream(src, start_step=1), batch_size=None, num_workers=2)
    got = [b for _, b in zip(range(3), workers, strict=False)]
    assert [b["step"] for b in got] == [1, 2, 3]
    assert torch.equal(got[2]["collated_global_crops"], batches[3]["collated_global_crops"])
    r0, r1 = _stream(src, rank=0, world_size=2), _stream(src, rank=1, world_size=2)
    assert set(r0.positions(5)).isdisjoint(r1.positions(5))
    epoch = [r0.index_at(p) for p in range(len(src))]
    assert sorted(epoch) == list(range(len(src)))  # each epoch visits every image once


def test_stream_skips_undecodable_images(tmp_path):
    write_images(tmp_path, 6)
    (tmp_path / "part0" / "broken.png").write_bytes(b"\x89PNG garbage")
    stream = _stream(build_source(tmp_path))
    for step in range(3):
        stream.batch(step)
    assert stream.n_bad >= 1
