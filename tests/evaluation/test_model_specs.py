"""`lvd evaluate --model` and `evaluate.models`: transformers folders and timm files evaluated like the project's own
export (the same numbers), interpolation options recorded in the results, and a `.pth` that records no resolution
refused with the way to give it (issue 22: a 28 px model's `.pth` was evaluated at 224 px without a word)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from flows.cli import main as cli
from flows.evaluate import parse_model_spec
from flows.models import feature_model
from infra.config import ConfigError, load_config
from training.checkpoint import export_backbone, official_state_dict, sidecar_path
from training.export.formats import export_model
from training.vision_transformer import DinoVisionTransformer


def bench(toy_classification, tmp_path):
    train, test = toy_classification
    cfg = {"data": {"eval_sets": [{"name": "toy", "train": str(train), "test": str(test)}]},
           "evaluate": {"protocols": ["knn"], "knn": {"ks": [1, 5]}, "precision": "fp32"}}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "bench.yaml"


def model(**kw) -> DinoVisionTransformer:
    torch.manual_seed(0)
    m = DinoVisionTransformer(img_size=16, patch_size=4, embed_dim=96, depth=4, num_heads=3, init_values=1.0, **kw)
    with torch.no_grad():
        m.pos_embed.normal_()
    return m.eval()


def test_transformers_and_timm_checkpoints_evaluate_as_the_project_export(toy_classification, tmp_path, capsys):
    """One model (offset 0 with antialias: what transformers' registers class and timm compute) as a project export,
    a transformers folder and a timm file: identical results."""
    m = model(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    export_backbone(m, tmp_path / "ours.safetensors", official_pth=False)
    export_model(m, "hf", tmp_path / "hf")
    export_model(m, "timm", tmp_path / "timm.safetensors")
    root = tmp_path / "runs"
    specs = ["--model", f"ours={tmp_path / 'ours.safetensors'}", "--model", f"hf={tmp_path / 'hf'}",
             "--model", f"timm={tmp_path / 'timm.safetensors'},kind=dinov2"]
    assert cli(["evaluate", str(bench(toy_classification, tmp_path)), *specs, "--root", str(root), "--name", "e"]) == 0
    capsys.readouterr()
    res = pd.read_parquet(root / "e" / "results.parquet")
    wide = res.pivot_table(index=["metric"], columns="model", values="value")
    pd.testing.assert_series_equal(wide["hf"], wide["ours"], check_names=False)
    pd.testing.assert_series_equal(wide["timm"], wide["ours"], check_names=False)
    fp = res.drop_duplicates("model").set_index("model")["fingerprint"]
    assert all(fp[n].endswith(":interpolate_offset=0:interpolate_antialias=True") for n in ("ours", "hf", "timm"))
    assert ":config=" in fp["hf"]  # a folder: its weights and its config.json


def test_wrong_arguments_and_a_configuration_without_benchmarks_are_one_message_each(tmp_path, capsys):
    """Before: a ValueError's traceback."""
    export_backbone(model(), tmp_path / "m.safetensors", official_pth=False)
    config = str(Path(__file__).resolve().parents[2] / "configs" / "own_folder.yaml")
    assert cli(["evaluate", config, "--model", f"m={tmp_path / 'm.safetensors'}",
                "--root", str(tmp_path)]) == 2  # fmt: skip
    assert capsys.readouterr().err == ("configuration has nothing to evaluate on (1 problem):\n  - data.eval_sets / "
                                       "evaluate.benchmarks: both empty; give an evaluation set or a benchmark\n")
    assert cli(["evaluate", config, "--model", "m", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("lvd evaluate's arguments are invalid (1 problem):\n  - --model 'm': expected "
                                       "NAME=PATH[,key=value...]\n")


def test_interpolation_options_reach_the_model_and_the_results(toy_classification, tmp_path, capsys):
    m = model(num_register_tokens=4)  # trained with the SSL defaults: offset 0.1, no antialias
    path = tmp_path / "official_reg4.pth"
    torch.save(official_state_dict(m), path)  # a plain official state dict: registers, no record of its offset
    entry = parse_model_spec(f"own={path},image_size=24,interpolate_offset=0.1,interpolate_antialias=false")
    assert (entry.backbone.interpolate_offset, entry.backbone.interpolate_antialias) == (0.1, False)
    features = feature_model(entry.backbone, "own")
    assert (features.model.interpolate_offset, features.model.interpolate_antialias) == (0.1, False)
    hub = feature_model(parse_model_spec(f"hub={path},image_size=24").backbone, "hub")
    assert (hub.model.interpolate_offset, hub.model.interpolate_antialias) == (0.0, True)  # registers: the hub's way
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(features.model(x), m(x))
        assert (hub.model(x) - m(x)).abs().max() > 1e-3
    # evaluate.models entries take the same keys; the results record the choice
    cfg = yaml.safe_load(bench(toy_classification, tmp_path).read_text())
    cfg["evaluate"]["models"] = [{"name": "own", "backbone": {"kind": "dinov2", "path": str(path), "image_size": 24,
                                                              "interpolate_offset": 0.1, "interpolate_antialias": False}}]
    (tmp_path / "with_models.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(tmp_path / "with_models.yaml")
    assert loaded.evaluate.models[0].backbone.interpolate_offset == 0.1
    root = tmp_path / "runs"
    assert cli(["evaluate", str(tmp_path / "bench.yaml"), "--model", f"own={path},image_size=24,interpolate_offset=0.1,"
                "interpolate_antialias=false", "--model", f"hub={path},image_size=24", "--root", str(root),
                "--name", "i"]) == 0
    capsys.readouterr()
    fp = pd.read_parquet(root / "i" / "results.parquet").drop_duplicates("model").set_index("model")["fingerprint"]
    assert fp["own"].endswith(":interpolate_offset=0.1:interpolate_antialias=False")
    assert fp["hub"].endswith(":interpolate_offset=0:interpolate_antialias=True")
    with pytest.raises(ConfigError, match="kind=timm"):
        load_config(tmp_path / "with_models.yaml", ["evaluate.models=[{name: t, backbone: {kind: timm, arch: "
                                                    "vit_small_patch14_dinov2, interpolate_offset: 0}}]"])


def test_a_pth_export_carries_its_resolution_and_a_bare_one_is_refused(toy_classification, tmp_path, capsys):
    m = model()
    export_backbone(m, tmp_path / "teacher_backbone.safetensors")  # + teacher_backbone.pth and its .pth.json
    pth = tmp_path / "teacher_backbone.pth"
    assert sidecar_path(pth).is_file()
    assert parse_model_spec(f"m={pth}").backbone.image_size == 16  # the training size, from the sidecar
    config = str(bench(toy_classification, tmp_path))
    root = tmp_path / "runs"
    assert cli(["evaluate", config, "--model", f"m={pth}", "--root", str(root), "--name", "p"]) == 0
    capsys.readouterr()
    sidecar_path(pth).unlink()  # a plain state dict: the size is not guessed
    with pytest.raises(ConfigError, match=r"records no training resolution.*4 x 4 patches of 4 px \(16 px\).*"
                                          r"--model m=.*teacher_backbone.pth,image_size=16"):
        parse_model_spec(f"m={pth}")
    assert cli(["evaluate", config, "--model", f"m={pth}", "--root", str(root), "--name", "q"]) == 2
    err = capsys.readouterr().err
    assert "records no training resolution" in err and f"--model m={pth},image_size=16" in err
    assert not (root / "q").exists()  # refused before any work
    assert cli(["evaluate", config, "--model", f"m={pth},image_size=16", "--root", str(root), "--name", "r"]) == 0
    capsys.readouterr()
    same = [pd.read_parquet(root / n / "results.parquet").set_index("metric")["value"] for n in ("p", "r")]
    pd.testing.assert_series_equal(*same)


def test_lvd_export_converts_a_checkpoint_it_reads(tmp_path, capsys):
    """`lvd export PATH`: a bare official `.pth` (no sidecar) to a transformers folder, the head count from --arch."""
    import transformers

    m = model()
    torch.save(official_state_dict(m), tmp_path / "bare.pth")
    assert cli(["export", str(tmp_path / "bare.pth"), str(tmp_path / "hf"), "--format", "hf", "--arch", "vit_pico"]) == 0
    out = capsys.readouterr().out
    assert f"hf export of {tmp_path / 'bare.pth'} -> {tmp_path / 'hf'}" in out
    assert "note: transformers' Dinov2Model resizes position embeddings with offset 0" in out  # m: offset 0.1
    assert f'AutoModel.from_pretrained("{tmp_path / "hf"}")' in out
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).pooler_output, m(x), atol=1e-5, rtol=1e-5)
    assert cli(["export", "no-such-run", str(tmp_path / "x"), "--format", "hf", "--root", str(tmp_path)]) == 2
    assert "neither a checkpoint path nor a run under" in capsys.readouterr().err

    # onnx: a graph per resolution (the checkpoint's position grid, 16 px, or --image-size), checked on export
    import onnxruntime as ort

    for extra, size in (([], 16), (["--image-size", "24"], 24)):
        dest = tmp_path / f"m{size}.onnx"
        assert cli(["export", str(tmp_path / "bare.pth"), str(dest), "--format", "onnx", "--arch", "vit_pico", *extra]) == 0
        out = capsys.readouterr().out
        assert f"note: the graph takes {size} x {size} px images (any batch); checked with onnxruntime" in out
        assert f'session = ort.InferenceSession("{dest}")' in out
        x = torch.randn(3, 3, size, size)
        got = ort.InferenceSession(str(dest)).run(["cls_token"], {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), m(x), atol=1e-5, rtol=1e-5)
    assert cli(["export", str(tmp_path / "bare.pth"), str(tmp_path / "h2"), "--format", "hf", "--image-size", "24"]) == 2
    assert capsys.readouterr().err == ("error: --image-size is the resolution of an onnx graph; a hf export works at any "
                                       "size\n")
