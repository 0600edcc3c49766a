"""Embedding: fp16 memory-mapped shards, per-shard resume, decode errors in the ledger, backbones from local files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from curation.embed import embed, pool_store, seed_store
from infra.config.curation import BackboneConfig
from infra.config.data import SeedSetConfig
from infra.features import Embedder
from infra.shards import ShardWriter, list_shards
from infra.stage import ShardTracker
from tests.curation.conftest import blob_image, png, write_folder, write_pool


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.GELU(), torch.nn.Flatten(), torch.nn.Linear(8 * 49, 16))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        return self.net(x)


def _pool(tmp_path, n: int = 20):
    return write_pool(tmp_path / "pool", [png(blob_image(i)) for i in range(n)], shard_size=8)


def test_embeddings_are_fp16_shards_equal_to_the_model(tmp_path) -> None:
    shards = _pool(tmp_path)
    model = Toy()
    emb = Embedder(model, 28, "toy", batch_size=6, precision="fp32")
    keep = {s for sh in shards for s in sh.read_table()["image_id"]} - {shards[1].read_table()["image_id"][0]}
    res = embed(shards, keep, [], tmp_path / "embed", lambda: emb, ShardTracker("embed", tmp_path / "embed"), "cpu")
    meta, store = pool_store(tmp_path / "embed")
    assert res.counts["kept"] == 19 and len(meta) == 19 and store.shape == (19, 16)
    assert [a.dtype for a in store.arrays] == [np.float16] * 3
    x = torch.stack([emb.preprocess(blob_image(i)) for i in range(20) if i != 8])
    ref = torch.nn.functional.normalize(model(x), dim=-1).detach().numpy()
    np.testing.assert_allclose(store.read_all(), ref, atol=1e-3)  # fp16 storage
    assert meta["row_id"].tolist() == [i for i in range(20) if i != 8]


def test_bf16_autocast_is_close_to_fp32(tmp_path) -> None:
    shards = _pool(tmp_path, 8)
    keep = set(shards[0].read_table()["image_id"])
    out = {}
    for precision in ("fp32", "bf16"):
        d = tmp_path / precision
        embed(shards, keep, [], d, lambda p=precision: Embedder(Toy(), 28, "toy", 8, p), ShardTracker("e", d), "cpu")
        out[precision] = pool_store(d)[1].read_all()
    assert not np.array_equal(out["fp32"], out["bf16"])
    np.testing.assert_allclose(out["bf16"], out["fp32"], atol=0.05)


def test_resume_redoes_only_unmarked_shards(tmp_path) -> None:
    shards = _pool(tmp_path)
    keep = {s for sh in shards for s in sh.read_table()["image_id"]}
    d = tmp_path / "embed"
    embed(shards, keep, [], d, lambda: Embedder(Toy(), 28, "toy", 4, "fp32"), ShardTracker("embed", d), "cpu")
    first = pool_store(d)[1].read_all()
    (d / "_done" / "00001.json").unlink()
    model = Toy()
    res = embed(shards, keep, [], d, lambda: Embedder(model, 28, "toy", 4, "fp32"), ShardTracker("embed", d), "cpu")
    assert model.calls == 8 and res.counts["kept"] == 20
    np.testing.assert_array_equal(pool_store(d)[1].read_all(), first)
    model2 = Toy()
    embed(shards, keep, [], d, lambda: Embedder(model2, 28, "toy", 4, "fp32"), ShardTracker("embed", d), "cpu")
    assert model2.calls == 0  # everything marked: no model is even run


def test_undecodable_images_are_dropped_in_the_ledger(tmp_path) -> None:
    with ShardWriter(tmp_path / "pool", "00000") as w:
        w.add("a" * 64, png(blob_image(0)), "png", row_id=0)
        w.add("b" * 64, b"\x89PNG not really", "png", row_id=1)
    shards = list_shards(tmp_path / "pool")
    d = tmp_path / "embed"
    res = embed(shards, {"a" * 64, "b" * 64}, [], d, lambda: Embedder(Toy(), 28, "toy"), ShardTracker("embed", d), "cpu")
    assert res.counts["kept"] == 1 and res.counts["dropped"] == {"decode_error": 1}
    ledger = pd.read_parquet(d / "ledger" / "00000.parquet")
    assert ledger[["row_id", "kind", "reason"]].values.tolist() == [[1, "drop", "decode_error"]]


def test_seed_sets_are_embedded_too(tmp_path) -> None:
    root = write_folder(tmp_path / "seeds", {"a": [blob_image(1), blob_image(2)], "b": [blob_image(3)]})
    d = tmp_path / "embed"
    seed = SeedSetConfig(name="s", path=root)
    embed([], set(), [seed], d, lambda: Embedder(Toy(), 28, "toy"), ShardTracker("embed", d), "cpu")
    meta, store = seed_store(d, "s")
    assert meta["name"].tolist() == ["a/000.png", "a/001.png", "b/000.png"] and meta["label"].tolist() == [0, 0, 1]
    assert store.shape == (3, 16)


def test_timm_backbone_from_a_local_weights_file(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    from flows.models import build_model

    ref = timm.create_model("resnet10t", pretrained=False, num_classes=1000).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")  # with its classifier: ignored when loaded as a backbone
    model = build_model(BackboneConfig(kind="timm", arch="resnet10t", path=tmp_path / "w.pth", image_size=64)).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), ref.forward_head(ref.forward_features(x), pre_logits=True))
    torch.save({k: v for k, v in ref.state_dict().items() if k != "conv1.0.weight"}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="weights missing"):
        build_model(BackboneConfig(kind="timm", arch="resnet10t", path=tmp_path / "bad.pth"))
    # the folder timm publishes on the hub (config.json + model.safetensors), as `path`
    timm.models.save_for_hf(ref, tmp_path / "hub", safe_serialization=True)
    model = build_model(BackboneConfig(kind="timm", arch="resnet10t", path=tmp_path / "hub", image_size=64)).eval()
    torch.testing.assert_close(model(x), ref.forward_head(ref.forward_features(x), pre_logits=True))


def test_dinov2_kind_needs_a_path() -> None:
    with pytest.raises(ValueError, match="needs `path`"):
        BackboneConfig(kind="dinov2", arch="vit_small", patch_size=14)


def test_grayscale_is_not_a_backbone_option() -> None:
    """`grayscale` was never read (embedding and evaluation share this section): it is now an unknown key, an error
    rather than a silently ignored setting."""
    with pytest.raises(ValueError, match="grayscale"):
        BackboneConfig(grayscale=True)


def test_official_dinov2_checkpoint_through_the_backbone_config(tmp_path) -> None:
    """kind=dinov2: a released-format state dict (`blocks.<i>.*` keys, `.pth`) loads into the project ViT."""
    registry = pytest.importorskip("training.registry", reason="needs the training package (training/)")
    from flows.models import build_model
    from training.checkpoint import official_state_dict

    torch.manual_seed(0)
    ref = registry.build_backbone("vit_pico", patch_size=4, img_size=28).eval()
    torch.save(official_state_dict(ref), tmp_path / "dinov2_vitp4_pretrain.pth")
    cfg = BackboneConfig(kind="dinov2", arch="vit_pico", patch_size=4, image_size=28, path=tmp_path / "dinov2_vitp4_pretrain.pth")
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(model(x), ref(x))
