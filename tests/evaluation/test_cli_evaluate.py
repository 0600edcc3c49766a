"""Acceptance 3: an official-format checkpoint and a project checkpoint evaluated on the same benchmark from the CLI."""

import json

import numpy as np
import pandas as pd
import torch
import yaml

from evaluation.features import read_image_set
from evaluation.results import read_table
from flows.cli import main as cli
from infra.features import eval_transform
from training.checkpoint import export_backbone, official_state_dict
from training.registry import build_backbone
from training.vision_transformer import DinoVisionTransformer


def test_official_and_project_checkpoints_side_by_side_then_compare(toy_classification, tmp_path, capsys):
    torch.manual_seed(0)
    export_backbone(build_backbone("vit_pico", patch_size=4, img_size=16), tmp_path / "ours.safetensors")
    (tmp_path / "ours.pth").rename(tmp_path / "dinov2_official.pth")  # official key names, a plain state dict
    train, test = toy_classification
    cfg = {"data": {"eval_sets": [{"name": "toy", "train": str(train), "test": str(test)}]},
           "evaluate": {"knn": {"ks": [1, 5]}, "linear": {"iterations": 30, "batch_size": 8},
                        "logreg": {"n_c": 3, "max_iter": 50}}}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    root = tmp_path / "runs"
    models = ["--model", f"ours={tmp_path / 'ours.safetensors'}",
              "--model", f"official={tmp_path / 'dinov2_official.pth'},image_size=16", "--raw-pixels"]
    assert cli(["evaluate", str(tmp_path / "bench.yaml"), *models, "--root", str(root), "--name", "a"]) == 0
    out = capsys.readouterr().out
    assert "official" in out and "ours" in out and "results:" in out
    res = pd.read_parquet(root / "a" / "results.parquet")
    assert set(res["model"]) == {"ours", "official", "raw-pixels"}
    assert set(res["protocol"]) == {"knn", "linear", "logreg"}
    wide = res.pivot_table(index=["protocol", "metric"], columns="model", values="value")
    # The same weights through the two loaders give the same features, hence identical numbers everywhere.
    pd.testing.assert_series_equal(wide["ours"], wide["official"], check_names=False)
    ckpt = res.drop_duplicates("model").set_index("model")["checkpoint"]
    assert ckpt["ours"] == str(tmp_path / "ours.safetensors") and ckpt["official"] == str(tmp_path / "dinov2_official.pth")
    assert ckpt["raw-pixels"] is None
    assert res["dataset_digest"].nunique() == 1 and res["config_hash"].nunique() == 3

    # A second evaluation with another linear-probe budget (the override after the options), then compare (by short
    # ids): kNN equal, linear flagged.
    assert cli(["evaluate", str(tmp_path / "bench.yaml"), *models[:2], "--root", str(root), "--name",
                "linear-budget-60", "evaluate.linear.iterations=60"]) == 0
    capsys.readouterr()
    linear = pd.read_parquet(root / "linear-budget-60" / "results.parquet").query("protocol == 'linear'")
    assert {json.loads(d)["iterations"] for d in linear["detail"]} == {60}
    assert cli(["compare", "a", "linear-b", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["benchmark", "protocol", "model", "metric", "a", "linear-budget-60", "delta"]
    knn = [line.split() for line in lines if line.split()[1:3] == ["knn", "ours"]]
    assert [k[3] for k in knn] == ["top1_k1", "top1_k5", "top5_k1", "top5_k5"]  # numbers in numeric order
    assert knn[0][-1] == "+0.00"
    assert all("different settings" in line for line in lines if " linear " in line and " ours " in line)
    assert len(read_table(root)) == len(res) + len(pd.read_parquet(root / "linear-budget-60" / "results.parquet"))


def test_official_checkpoint_with_released_geometry_is_evaluated_at_224(toy_classification, tmp_path, capsys):
    """A released checkpoint's pos-embed covers 518 px at patch 14 (1 + 37 x 37 tokens); ``lvd evaluate`` reads it as
    is and evaluates at 224 px (16 x 16 patches, pos-embed interpolated): the cached features are a direct forward."""
    torch.manual_seed(0)
    # The released geometry and conventions (LayerScale, 0.1 interpolation offset, 64-dim heads) at a tiny size.
    model = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=64, depth=2, num_heads=1, init_values=1.0)
    with torch.no_grad():
        model.pos_embed.normal_()  # strong position signal: a wrong interpolation shows in the features
    state = official_state_dict(model)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 64)
    torch.save(state, tmp_path / "dinov2_tiny14_pretrain.pth")
    train, test = toy_classification
    cfg = {"data": {"eval_sets": [{"name": "toy", "train": str(train), "test": str(test)}]},
           "evaluate": {"protocols": ["knn"], "knn": {"ks": [1, 5]}, "precision": "fp32"}}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    root = tmp_path / "runs"
    official = f"official={tmp_path / 'dinov2_tiny14_pretrain.pth'}"  # no image_size: official checkpoints get 224
    assert cli(["evaluate", str(tmp_path / "bench.yaml"), "--model", official, "--root", str(root), "--name", "o"]) == 0
    capsys.readouterr()
    res = pd.read_parquet(root / "o" / "results.parquet")
    assert set(res["model"]) == {"official"} and len(res) == 4  # top-1 / top-5 at k = 1, 5

    images = read_image_set(train)
    metas = {d: json.loads((d / "meta.json").read_text()) for d in (root / ".cache" / "features").glob("*/*")}
    cached = [d for d, meta in metas.items() if meta["n"] == 24]  # the train split (24 images)
    assert len(cached) == 1 and json.loads((cached[0] / "meta.json").read_text())["image_size"] == 224
    x = torch.stack([eval_transform(im, 224) for im in images.load()])  # 24, 3, 224, 224
    with torch.inference_mode():
        layers = model.eval().get_intermediate_layers(x, n=2, return_class_token=True, norm=True)
        direct = torch.stack([cls for _, cls in layers], 1)  # 24, 2 blocks, 64
        assert layers[-1][0].shape == (24, 16 * 16, 64)
        torch.testing.assert_close(direct[:, -1], model(x))
        model.interpolate_offset = 0.0  # the register models' convention: other sampling positions, other features
        shifted = model(x)
    cls = torch.from_numpy(np.load(cached[0] / "cls.npy"))
    torch.testing.assert_close(cls, direct)
    assert not torch.allclose(cls[:, -1], shifted, atol=1e-3)
