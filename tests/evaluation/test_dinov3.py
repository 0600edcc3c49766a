"""DINOv3 as it is published (curation/models/dinov3.py): a transformers folder, Meta's release `.pth` and timm's
weights give transformers' own class token (an implementation independent of timm's, which lvd runs), load as an
embedder and an evaluation reference with the same results in every layout, and are refused clearly where they
cannot be read, before any stage. (Checked once against Meta's own code, facebookresearch/dinov3 at 6876159, on tiny
random models of Meta's layout, MLP and SwiGLU, with and without q/v biases: identical outputs, max difference 0.)"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

from curation.models.dinov3 import arch_of, is_dinov3, load_dinov3, meta_from_hf, read_dinov3
from flows.cli import main as cli
from flows.evaluate import parse_model_spec
from flows.models import build_model
from flows.preflight import check_model_files
from infra.config import load_config
from infra.config.curation import BackboneConfig
from training.export.formats import export_model
from training.vision_transformer import DinoVisionTransformer

# The names of Meta's DINOv3 ViT state dict (dinov3/models/vision_transformer.py, MLP, qkv bias, 4 storage tokens),
# as its code wrote them: per block, then the rest.
META_BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.qkv.bias_mask", "attn.proj.weight",
              "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"]  # fmt: skip
META_TOP = ["cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "rope_embed.periods", "norm.weight", "norm.bias"]  # fmt: skip


def hf_dinov3(folder, gated: bool = False, bias: bool = True):
    """A tiny transformers DINOv3 (2 blocks, 128-d, 2 heads, patch 16, 4 registers), its weights moved off their
    initial values (layer scales, biases and norms included), saved as `save_pretrained` writes it."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=16, image_size=64,
                             intermediate_size=176 if gated else 256, use_gated_mlp=gated,
                             hidden_act="silu" if gated else "gelu", num_register_tokens=4, layerscale_value=0.5,
                             query_bias=bias, value_bias=bias)  # fmt: skip
    model = DINOv3ViTModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model


def meta_file(model, path, wrap: bool = False):
    """The same weights as Meta's release writes them (with the buffers its model keeps: RoPE periods, qkv bias
    masks); `wrap`: inside a training checkpoint, `{"teacher": {"backbone.*": ...}}`."""
    state = meta_from_hf(model.state_dict())
    dim = state["cls_token"].shape[-1]
    state["rope_embed.periods"] = torch.arange(1, dim // 2 // 2 + 1, dtype=torch.float32)
    for i in range(2):
        if f"blocks.{i}.attn.qkv.bias" in state:
            state[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}} if wrap else state, path)
    return state


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("gated", "bias"), [(False, True), (True, True), (False, False)])
def test_every_published_layout_gives_transformers_class_token(tmp_path, gated, bias):
    hf = hf_dinov3(tmp_path / "hf", gated, bias)
    x = torch.randn(2, 3, 64, 80)  # not square: RoPE over a 4 x 5 grid
    with torch.no_grad():
        ref = hf(pixel_values=x).pooler_output  # the class token after the final norm
        same(load_dinov3(tmp_path / "hf")(x), ref)

        meta = meta_file(hf, tmp_path / "meta.pth", wrap=gated)
        if not gated:  # Meta's names, exactly as its code writes them
            block = [n for n in META_BLOCK if bias or "qkv.bias" not in n]
            assert set(meta) == {*META_TOP, *(f"blocks.{i}.{n}" for i in range(2) for n in block)}
        same(load_dinov3(tmp_path / "meta.pth")(x), ref)

        model = load_dinov3(tmp_path / "meta.pth")  # timm's own layout: a state dict, and a hub folder
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "timm.safetensors"))
        same(load_dinov3(tmp_path / "timm.safetensors")(x), ref)
    arch = model.dinov3_arch
    assert (arch.embed_dim, arch.depth, arch.num_heads, arch.patch_size, arch.storage_tokens, arch.swiglu,
            arch.hidden, arch.qkv_bias) == (128, 2, 2, 16, 4, gated, 176 if gated else 256, bias)  # fmt: skip


def test_a_timm_hub_folder_and_a_hugging_face_cache_are_read(tmp_path):
    hf = hf_dinov3(tmp_path / "hf")
    x = torch.randn(1, 3, 64, 64)
    model = load_dinov3(tmp_path / "hf")
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(timm_dir / "model.safetensors"))
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_dinov3",
                                                      "model_args": {"num_heads": 2}}))  # fmt: skip
    snapshot = tmp_path / "models--facebook--dinov3-tiny" / "snapshots" / "abc123"
    snapshot.parent.mkdir(parents=True)
    (tmp_path / "hf").rename(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    with torch.no_grad():
        ref = hf(pixel_values=x).pooler_output
        same(load_dinov3(timm_dir)(x), ref)
        same(load_dinov3(snapshot.parents[1])(x), ref)  # the cache's repository folder: its main snapshot
        # kind=timm with a DINOv3 architecture: the class token too (timm's default pools the patch tokens' mean)
        same(build_model(BackboneConfig(kind="timm", arch="vit_small_patch16_dinov3", path=timm_dir))(x), ref)
    assert read_dinov3(timm_dir)[1:] == ("timm", 2)
    assert is_dinov3(snapshot.parents[1]) and is_dinov3(timm_dir) and parse_model_spec(
        f"d3={snapshot.parents[1]}").backbone.kind == "dinov3"  # (lvd evaluate without kind=)


def test_what_cannot_be_read_is_refused_with_the_reason(tmp_path):
    hf = hf_dinov3(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.430, 0.411, 0.296], "image_std": [0.213, 0.156, 0.143]}))  # the satellite weights' statistics
    with pytest.raises(ValueError, match=r"normalised with mean \[0.43, 0.411, 0.296\] .* ImageNet-normalised"):
        load_dinov3(tmp_path / "hf")
    v2 = DinoVisionTransformer(img_size=16, patch_size=4, embed_dim=96, depth=2, num_heads=3, init_values=1.0)
    export_model(v2, "hf", tmp_path / "v2")
    torch.save(v2.state_dict(), tmp_path / "v2.pth")
    assert not is_dinov3(tmp_path / "v2") and not is_dinov3(tmp_path / "v2.pth")
    with pytest.raises(ValueError, match="not a DINOv3 checkpoint"):
        load_dinov3(tmp_path / "v2.pth")
    meta_file(hf, tmp_path / "meta.pth")
    state, layout, _ = read_dinov3(tmp_path / "meta.pth")
    state = {k: v for k, v in state.items() if not k.startswith("blocks.1.")} | {
        f"blocks.1.{k.split('.', 2)[2]}": v for k, v in state.items() if k.startswith("blocks.0.")}  # a block short
    del state["blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"weights do not fit DINOv3 ViT 128-dim x 2 blocks .* missing \['blocks.1.mlp"):
        load_dinov3(tmp_path / "short.pth")
    assert arch_of(state, layout).depth == 2


def test_a_dinov3_embedder_is_checked_at_start_up_and_one_given_as_a_dinov2_names_the_kind(tmp_path):
    hf_dinov3(tmp_path / "d3")
    meta_file(hf_dinov3(tmp_path / "again"), tmp_path / "meta.pth")

    def problems(kind: str, path, size: int) -> list[str]:
        cfg = load_config(None, ["nsfw.enabled=false", "faces.backend=haar", f"run.root={tmp_path / 'runs'}",
                                 f"embed.backbone={{kind: {kind}, path: {path}, image_size: {size}}}"])  # fmt: skip
        return check_model_files(cfg, {"embed"})

    assert problems("dinov3", tmp_path / "d3", 28) == [
        f"embed.backbone.path: {tmp_path / 'd3'}: image_size 28 gives this DINOv3 (patch 16) a 1x1 patch grid: set "
        "embed.backbone.image_size (DINOv3 is evaluated at 224 px and more)"]
    assert problems("dinov3", tmp_path / "d3", 64) == [] and problems("dinov3", tmp_path / "meta.pth", 64) == []
    assert problems("dinov2", tmp_path / "meta.pth", 64) == [
        f"embed.backbone.path: {tmp_path / 'meta.pth'} cannot be used: ValueError: {tmp_path / 'meta.pth'} holds DINOv3 "
        "weights (its storage tokens); a DINOv3 is read with backbone kind: dinov3 (as an embedder or evaluation "
        "reference), not as a DINOv2"]
    [problem] = problems("dinov2", tmp_path / "d3", 64)
    assert problem.endswith("model_type 'dinov3_vit' is not a DINOv2 (['dinov2', 'dinov2_with_registers']): a DINOv3, "
                            "read with backbone kind: dinov3")
    assert load_config(None, [f"embed.backbone={{kind: dinov3, path: {tmp_path / 'meta.pth'}}}"]).embed.backbone.label \
        == "dinov3:meta.pth"


def test_lvd_evaluate_gives_the_same_results_for_every_layout(toy_classification, tmp_path, capsys):
    hf = hf_dinov3(tmp_path / "hf")
    meta_file(hf, tmp_path / "meta.pth")
    assert parse_model_spec(f"m={tmp_path / 'meta.pth'}").backbone.model_dump(include={"kind", "image_size"}) == {
        "kind": "dinov3", "image_size": 224}  # found without kind=, at DINOv3's evaluation size
    train, test = toy_classification
    bench = tmp_path / "bench.yaml"
    bench.write_text(yaml.safe_dump({"data": {"eval_sets": [{"name": "toy", "train": str(train), "test": str(test)}]},
                                     "evaluate": {"protocols": ["knn"], "knn": {"ks": [1, 5]}, "precision": "fp32"}}))
    root = tmp_path / "runs"
    specs = ["--model", f"hf={tmp_path / 'hf'},image_size=64", "--model", f"meta={tmp_path / 'meta.pth'},image_size=64"]
    assert cli(["evaluate", str(bench), *specs, "--root", str(root), "--name", "e"]) == 0
    capsys.readouterr()
    res = pd.read_parquet(root / "e" / "results.parquet")
    wide = res.pivot_table(index=["metric"], columns="model", values="value")
    pd.testing.assert_series_equal(wide["meta"], wide["hf"], check_names=False)
    fp = res.drop_duplicates("model").set_index("model")["fingerprint"]
    assert fp["hf"].startswith("dinov3:") and ":config=" in fp["hf"] and fp["meta"].startswith("dinov3:")
