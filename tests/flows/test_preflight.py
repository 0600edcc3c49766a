"""Every model file a run will use is opened and checked when `lvd run` starts: a wrong file fails in seconds, naming the
config key and the file, before any stage runs and before a run directory exists."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from flows.cli import main as cli
from flows.preflight import check_model_files
from infra.config import load_config
from tests.curation import sscd_onnx
from tests.curation.tiny_onnx import mean_pool_linear

# Keep each check to the file under test: no NSFW model, the Haar cascade (ships with OpenCV).
QUIET = ["nsfw.enabled=false", "faces.backend=haar"]


def _cfg(tmp_path, *overrides):
    return load_config(None, [*QUIET, f"run.root={tmp_path / 'runs'}", *overrides])


def test_a_good_sscd_export_passes(tmp_path):
    path = sscd_onnx.save(tmp_path / "sscd.onnx", "uint8_nhwc", dims=16)
    assert check_model_files(_cfg(tmp_path, f"dedup.descriptor.path={path}", "dedup.descriptor.dims=16")) == []


def test_missing_wrong_and_mis_sized_files_name_the_key_and_the_file(tmp_path):
    missing = tmp_path / "nowhere.onnx"
    assert check_model_files(_cfg(tmp_path, f"dedup.descriptor.path={missing}")) == [
        f"dedup.descriptor.path: {missing} does not exist"]  # fmt: skip
    junk = tmp_path / "sscd.torchscript.pt"
    junk.write_text("not a model")
    [problem] = check_model_files(_cfg(tmp_path, f"dedup.descriptor.path={junk}"))
    assert problem.startswith(f"dedup.descriptor.path: {junk} cannot be used: RuntimeError")
    small = sscd_onnx.save(tmp_path / "sscd.onnx", "float_nchw", dims=16)
    assert check_model_files(_cfg(tmp_path, f"dedup.descriptor.path={small}")) == [
        f"dedup.descriptor.path: {small}: gives 16-d descriptors, but dedup.descriptor.dims is 512"]  # fmt: skip


def test_a_backbone_folder_is_checked_as_a_model_not_refused_as_missing(tmp_path):
    """A transformers folder (what `save_pretrained` writes; docs/models.md lists it among the checkpoints lvd reads)
    as the embedder: before, the start-up check took every folder for a missing file."""
    from training.export.formats import export_model
    from training.vision_transformer import DinoVisionTransformer

    export_model(DinoVisionTransformer(img_size=16, patch_size=4, embed_dim=96, depth=2, num_heads=3), "hf",
                 tmp_path / "hf")  # fmt: skip
    backbone = f"embed.backbone={{kind: dinov2, path: {tmp_path / 'hf'}, image_size: 16}}"
    assert check_model_files(_cfg(tmp_path, backbone), {"embed"}) == []
    (tmp_path / "hf" / "model.safetensors").unlink()
    assert check_model_files(_cfg(tmp_path, backbone), {"embed"}) == [
        f"embed.backbone.path: {tmp_path / 'hf'} cannot be used: FileNotFoundError: {tmp_path / 'hf'} holds no "
        "model.safetensors (sharded checkpoints are not read)"]


def test_every_model_of_the_run_is_checked_and_every_problem_listed(tmp_path):
    encoder = tmp_path / "clip.onnx"
    encoder.write_bytes(mean_pool_linear(np.ones((3, 8), np.float32), 32))  # 8-d embeddings
    head = tmp_path / "head.npz"
    np.savez(head, w0=np.ones((4, 1), np.float32), b0=np.zeros(1, np.float32))  # expects 4-d
    cfg = _cfg(tmp_path, "nsfw.enabled=true", "nsfw.backend=clip_head", f"nsfw.encoder_path={encoder}",
               f"nsfw.head_path={head}", "nsfw.input_size=32", "faces.backend=yunet",
               f"faces.model_path={tmp_path / 'yunet.onnx'}", "dedup.descriptor.backend=pixel",
               f"embed.backbone.path={tmp_path / 'vit.pth'}")  # fmt: skip
    problems = check_model_files(cfg)
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"nsfw.encoder_path / nsfw.head_path: {encoder}, {head} cannot be used: ValueError")
    assert problems[1:] == [f"faces.model_path: {tmp_path / 'yunet.onnx'} does not exist",
                            f"embed.backbone.path: {tmp_path / 'vit.pth'} does not exist"]  # fmt: skip


def test_stages_that_do_not_run_load_nothing(tmp_path):
    cfg = _cfg(tmp_path, f"dedup.descriptor.path={tmp_path / 'gone.onnx'}", "faces.enabled=false")
    assert check_model_files(cfg, stages={"ingest", "nsfw", "faces"}) == []
    assert check_model_files(load_config(None, [*QUIET, "dedup.enabled=false"])) == []


def test_lvd_run_with_a_wrong_file_fails_before_any_stage(tmp_path, capsys, _no_prefect):
    urls = tmp_path / "urls.parquet"
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"]}).to_parquet(urls)
    junk = tmp_path / "sscd_disc_mixup.onnx"
    junk.write_bytes(b"\0" * 64)
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{url_list: {urls}}}\ndedup: {{descriptor: {{path: {junk}}}}}\n"
                      "embed: {allow_random_init: true}\n")
    t = time.perf_counter()
    code = cli(["run", str(config), *QUIET, f"run.root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "configuration is invalid (1 problem)" in err
    assert f"dedup.descriptor.path: {junk} cannot be used" in err
    assert not (tmp_path / "runs").exists()  # no run directory, no stage
    assert time.perf_counter() - t < 60


@pytest.fixture
def _no_prefect(monkeypatch):
    """`lvd run` must not reach the flow in these tests."""
    import flows.cli.running as running

    monkeypatch.setattr(running, "_run_flow", lambda *a: pytest.fail("the flow started"))
