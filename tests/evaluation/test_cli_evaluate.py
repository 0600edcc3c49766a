"""Acceptance 3: an official-format checkpoint and a project checkpoint evaluated on the same benchmark from the CLI."""

import pandas as pd
import torch
import yaml

from evaluation.results import read_table
from infra.cli import main as cli
from training.checkpoint import export_backbone
from training.registry import build_backbone


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

    # A second evaluation with another linear-probe budget, then compare: kNN equal, linear flagged.
    assert cli(["evaluate", str(tmp_path / "bench.yaml"), "evaluate.linear.iterations=60", *models[:2],
                "--root", str(root), "--name", "b"]) == 0
    capsys.readouterr()
    assert cli(["compare", "a", "b", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    knn = next(line for line in lines if line.split()[1:4] == ["knn", "ours", "top1_k1"])
    assert knn.split()[-1] == "+0.00"
    assert all("different settings" in line for line in lines if " linear " in line and " ours " in line)
    assert len(read_table(root)) == len(res) + len(pd.read_parquet(root / "b" / "results.parquet"))
