"""Exports loaded by the libraries themselves (transformers' AutoModel, timm's create_model with strict keys, the
official state dict with its sidecar): class and patch tokens equal this project's forward to 1e-5 (fp32) at the
training resolution and at another one. Where the library resizes position embeddings differently (the reference's
0.1 offset), the other resolution equals this project's forward with the library's convention, and the export says
so. The reverse (the library's own checkpoints read back) is tested on models the libraries make here."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from infra.features import eval_transform
from training.checkpoint import load_backbone, official_state_dict, read_sidecar
from training.export.formats import export_model
from training.export.hf import CLASSES, model_type_for
from training.export.timm_format import INTERPOLATION
from training.vision_transformer import DinoVisionTransformer

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

TINY = {"img_size": 28, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3, "init_values": 1e-5}
VARIANTS = {
    # the reference's SSL defaults: LayerScale, MLP, 0.1 offset without antialias
    "reference": {},
    # the hub's register models: registers, SwiGLU, offset 0 with antialias
    "registers_swiglu": {"num_register_tokens": 4, "ffn_layer": "swiglufused", "interpolate_offset": 0.0,
                         "interpolate_antialias": True},
    "offset0": {"interpolate_offset": 0.0},
    "offset0_antialias": {"interpolate_offset": 0.0, "interpolate_antialias": True},
    "no_layerscale_no_biases": {"init_values": None, "qkv_bias": False, "proj_bias": False, "ffn_bias": False},
    # official register models trained with the SSL defaults, at patch 14 (3 x 3 patches)
    "registers_offset01_patch14": {"img_size": 42, "patch_size": 14, "num_register_tokens": 4},
}


def make(**changes) -> DinoVisionTransformer:
    torch.manual_seed(0)
    model = DinoVisionTransformer(**{**TINY, **changes})
    with torch.no_grad():  # every parameter drawn: a position embedding, gamma or bias left out would show
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        model.pos_embed.normal_()  # a strong position signal: a different resizing shows in the features
    return model.eval()


def ours(model: DinoVisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def with_interpolation(model: DinoVisionTransformer, offset: float, antialias: bool) -> DinoVisionTransformer:
    twin = copy.deepcopy(model)
    twin.interpolate_offset, twin.interpolate_antialias = offset, antialias
    return twin


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def sizes(model: DinoVisionTransformer) -> tuple[int, int]:
    return model.arch_kwargs["img_size"], model.arch_kwargs["img_size"] + 3 * model.patch_size


def check_library(model, library_tokens, convention: tuple[float, bool]) -> None:
    """The library's tokens equal ours at the training size; at another size ours, or (another convention) ours
    with the library's position-embedding resizing, and then measurably not ours."""
    own = (model.interpolate_offset, bool(model.interpolate_antialias))
    for size in sizes(model):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        cls, patches = library_tokens(x)
        reference = model if size == sizes(model)[0] or own == convention else with_interpolation(model, *convention)
        close(cls, ours(reference, x)[0])
        close(patches, ours(reference, x)[1])
        if reference is not model:
            assert (patches - ours(model, x)[1]).abs().max() > 1e-2


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_loads_the_hf_export(variant, tmp_path):
    model = make(**VARIANTS[variant])
    exported = export_model(model, "hf", tmp_path / "hf")
    hf, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    hf.eval()
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched key
    model_type = model_type_for(model.arch_kwargs)
    assert type(hf).__name__ == CLASSES[model_type][0]
    r = model.num_register_tokens

    def tokens(x):
        with torch.no_grad():
            out = hf(pixel_values=x)
        close(out.pooler_output, out.last_hidden_state[:, 0])
        return out.last_hidden_state[:, 0], out.last_hidden_state[:, 1 + r:]

    convention = CLASSES[model_type][1:]
    check_library(model, tokens, convention)
    exact = (model.interpolate_offset, model.interpolate_antialias) == convention
    assert (exported.notes == []) == exact
    assert exported.usage == f'from transformers import AutoModel\nmodel = AutoModel.from_pretrained("{tmp_path / "hf"}")'

    # ... and read back: the transformers class's resizing, features equal to the library's at both sizes
    back = load_backbone(tmp_path / "hf")
    assert (back.interpolate_offset, back.interpolate_antialias) == convention
    assert back.num_register_tokens == r and (back.arch_kwargs["init_values"] is None) == (not model.arch_kwargs[
        "init_values"])
    check_library(model, lambda x: ours(back, x), convention)


@pytest.mark.parametrize("size", [28, 42])
def test_the_hf_processor_gives_the_pixels_lvd_evaluates_with(size, tmp_path):
    export_model(make(img_size=size, patch_size=14 if size == 42 else 4), "hf", tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    img = Image.fromarray(skdata.astronaut()).resize((300, 200))  # a real photograph, not square
    pixels = processor(images=img, return_tensors="pt").pixel_values[0]
    assert pixels.shape == (3, size, size)
    torch.testing.assert_close(pixels, eval_transform(img, size), atol=0, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_timm_loads_the_timm_export_with_strict_keys(variant, tmp_path):
    model = make(**VARIANTS[variant])
    path = tmp_path / "model.safetensors"
    exported = export_model(model, "timm", path)
    call = read_sidecar(path)["timm"]
    # timm's own loader: pretrained_cfg_overlay's file, checkpoint_filter_fn, load_state_dict(strict=True)
    net = timm.create_model(call["model_name"], pretrained=True, dynamic_img_size=True, **call["kwargs"],
                            pretrained_cfg_overlay={"file": str(path), **call["pretrained_cfg_overlay"]}).eval()
    assert net.num_prefix_tokens == 1 + model.num_register_tokens
    assert tuple(timm.data.resolve_data_config(model=net)["input_size"]) == (3, *[model.arch_kwargs["img_size"]] * 2)

    def tokens(x):
        with torch.no_grad():
            out = net.forward_features(x)
        return out[:, 0], out[:, net.num_prefix_tokens:]

    check_library(model, tokens, INTERPOLATION)
    assert (exported.notes == []) == ((model.interpolate_offset, model.interpolate_antialias) == INTERPOLATION)
    assert exported.usage.startswith(f'import timm\nmodel = timm.create_model("{call["model_name"]}", pretrained=True')

    back = load_backbone(path)  # the sidecar gives the head count; timm's resizing comes along
    assert (back.interpolate_offset, back.interpolate_antialias) == INTERPOLATION
    check_library(model, lambda x: ours(back, x), INTERPOLATION)


def test_a_released_size_exports_to_its_timm_name_without_overrides(tmp_path):
    model = make(img_size=28, patch_size=14, embed_dim=384, depth=12, num_heads=6)  # ViT-S/14
    path = tmp_path / "vits.safetensors"
    exported = export_model(model, "timm", path)
    call = read_sidecar(path)["timm"]
    assert (call["model_name"], call["kwargs"]) == ("vit_small_patch14_dinov2", {"img_size": 28})
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=True, img_size=28,
                            pretrained_cfg_overlay={"file": str(path)}).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        close(net.forward_features(x)[:, 0], ours(model, x)[0])
    assert exported.usage == (f'import timm\nmodel = timm.create_model("vit_small_patch14_dinov2", pretrained=True, '
                              f'img_size=28, pretrained_cfg_overlay={{"file": "{path}", "input_size": (3, 28, 28)}})')


def test_the_official_pth_export_carries_its_architecture_and_resolution(tmp_path):
    model = make(**VARIANTS["registers_offset01_patch14"])
    path = tmp_path / "teacher_backbone.pth"
    exported = export_model(model, "pth", path)
    state = torch.load(path, weights_only=True)
    assert list(state) == list(official_state_dict(model))  # the plain official state dict, nothing added
    sidecar = read_sidecar(path)
    assert sidecar["image_size"] == 42 and sidecar["lvd_backbone"] == model.arch_kwargs
    back = load_backbone(path)
    assert back.arch_kwargs == model.arch_kwargs  # offset 0.1 with registers: recorded, not guessed from registers
    for size in sizes(model):
        x = torch.randn(2, 3, size, size)
        close(ours(back, x)[1], ours(model, x)[1])
    assert 'torch.hub.load("facebookresearch/dinov2"' not in exported.usage  # not a released size: the class itself
    assert "DinoVisionTransformer(block_chunks=0, **json.load" in exported.usage  # official default: 1 chunk


def test_hub_builder_call_for_a_released_size():
    from training.export.formats import torch_usage

    arch = {"img_size": 224, "patch_size": 14, "in_chans": 3, "embed_dim": 384, "depth": 12, "num_heads": 6,
            "mlp_ratio": 4.0, "qkv_bias": True, "ffn_bias": True, "proj_bias": True, "init_values": 1e-5,
            "ffn_layer": "mlp", "num_register_tokens": 4, "interpolate_antialias": False, "interpolate_offset": 0.1}
    assert torch_usage(arch, "m.pth") == ('import torch\nmodel = torch.hub.load("facebookresearch/dinov2", "dinov2_vits14", '
                                         'pretrained=False, img_size=224, num_register_tokens=4)\n'
                                         'model.load_state_dict(torch.load("m.pth"))')


@pytest.mark.parametrize("registers", [0, 4])
def test_a_checkpoint_transformers_saved_is_read_back(registers, tmp_path):
    kw = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "image_size": 28, "patch_size": 4,
          "use_swiglu_ffn": bool(registers)}
    if registers:
        hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.5)
    hf.eval().save_pretrained(tmp_path)
    back = load_backbone(tmp_path)
    assert back.num_register_tokens == registers
    for size in (28, 40):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            out = hf(pixel_values=x).last_hidden_state
        close(ours(back, x)[0], out[:, 0])
        close(ours(back, x)[1], out[:, 1 + registers:])


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
                                  "vit_giant_patch14_dinov2"])
def test_a_state_dict_timm_saved_is_read_back(name, tmp_path):
    """timm's DINOv2 models at the width and depth of vit_pico (96 x 4, 3 heads: the head count the registry gives)."""
    net = timm.create_model(name, pretrained=False, num_classes=0, img_size=28, patch_size=4, embed_dim=96, depth=4,
                            num_heads=3, dynamic_img_size=True, **({"mlp_ratio": 512.5 / 96} if "giant" in name else {}))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    net.eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    back = load_backbone(tmp_path / "timm.safetensors")
    assert (back.num_heads, back.num_register_tokens) == (3, net.num_prefix_tokens - 1)
    for size in (28, 40):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            out = net.forward_features(x)
        close(ours(back, x)[0], out[:, 0])
        close(ours(back, x)[1], out[:, net.num_prefix_tokens:])


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
                                  "vit_giant_patch14_dinov2"])
def test_a_folder_as_timm_publishes_it_on_the_hub_is_read(name, tmp_path):
    """timm publishes DINOv2 as hub folders (`timm/vit_small_patch14_dinov2.lvd142m`: config.json naming the timm
    architecture, model.safetensors): read as timm (it was taken for a transformers folder and refused, "model_type
    None is not a DINOv2"); the head count from the config's model_args, the resolution from its pretrained_cfg."""
    from timm.models import save_for_hf

    from training.checkpoint import recorded_image_size

    net = timm.create_model(name, pretrained=False, num_classes=0, img_size=28, patch_size=4, embed_dim=96, depth=4,
                            num_heads=2, **({"mlp_ratio": 512.5 / 96} if "giant" in name else {}))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    save_for_hf(net.eval(), tmp_path, safe_serialization=True)  # what timm's push_to_hf_hub uploads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    back = load_backbone(tmp_path)
    assert (back.num_heads, back.num_register_tokens, recorded_image_size(tmp_path)) == (
        2, net.num_prefix_tokens - 1, 28)  # 2 heads: not the registry's 3 for 96 x 4
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = net.forward_features(x)
    close(ours(back, x)[0], out[:, 0])
    close(ours(back, x)[1], out[:, net.num_prefix_tokens:])


def test_a_hugging_face_cache_folder_reads_the_snapshot_refs_main_names(tmp_path):
    """`snapshot_download("facebook/dinov2-small")` leaves `models--facebook--dinov2-small/` with the files in
    `snapshots/<commit>/`: that folder is read as the snapshot `refs/main` names (the one transformers loads), for
    `lvd export`, `lvd evaluate --model` and `embed.backbone.path` alike; with several snapshots and no ref, the
    error names them."""
    from infra.config.curation import BackboneConfig
    from training.checkpoint import recorded_image_size

    cache = tmp_path / "models--facebook--dinov2-tiny"
    kw = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "image_size": 28, "patch_size": 4}
    for commit, seed in (("0ld", 1), ("c0ffee", 2)):
        torch.manual_seed(seed)
        transformers.Dinov2Model(transformers.Dinov2Config(**kw)).save_pretrained(cache / "snapshots" / commit)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("c0ffee")
    current = cache / "snapshots" / "c0ffee"
    assert BackboneConfig(kind="dinov2", path=cache).path == current
    assert recorded_image_size(cache) == 28
    x = torch.randn(2, 3, 28, 28)
    close(ours(load_backbone(cache), x)[0], ours(load_backbone(current), x)[0])
    (cache / "refs" / "main").unlink()
    with pytest.raises(FileNotFoundError, match=r"a Hugging Face cache folder with 2 snapshots and no refs/main: give "
                                                r"one of .*snapshots/0ld, .*snapshots/c0ffee\)"):
        load_backbone(cache)


def test_a_timm_folder_of_another_model_is_refused_by_name(tmp_path):
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1), tmp_path)
    with pytest.raises(ValueError, match=r"timm architecture 'vit_tiny_patch16_224' is not a DINOv2"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("fmt", ["hf", "timm"])
def test_a_transformers_or_timm_checkpoint_starts_training(fmt, tmp_path):
    """As `train.student.pretrained_weights`: the round trip gives the student (and the teacher) the exported
    backbone's weights exactly; timm keeps no mask token, which starts at zero (the reference's initialisation)."""
    from tiny import tiny_config

    from training.module import DinoV2Module
    from training.weights import init_from_pretrained

    model = make(img_size=16, patch_size=4, embed_dim=96, depth=4, num_heads=3)  # vit_pico, tiny_config's student
    dest = tmp_path / ("hf" if fmt == "hf" else "model.safetensors")
    export_model(model, fmt, dest)
    meta = DinoV2Module(tiny_config(), seed=0).meta
    init_from_pretrained(meta, dest)
    want = official_state_dict(model)
    if fmt == "timm":
        want["mask_token"] = torch.zeros(1, 96)
    for part in (meta.student, meta.teacher):
        got = part["backbone"].state_dict()
        assert set(got) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_onnxruntime_runs_the_onnx_export_as_the_model_computes(variant, tmp_path):
    """At the training resolution and at another one (the graph is made per resolution), any batch: the class,
    patch and register tokens equal this project's fp32 forward; the sidecar says what goes in and comes out."""
    import json

    import onnxruntime as ort

    model = make(**VARIANTS[variant])
    r, d = model.num_register_tokens, model.embed_dim
    for size in sizes(model):
        dest = tmp_path / f"{size}.onnx"
        exported = export_model(model, "onnx", dest, image_size=size)
        session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
        got = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            out = model.forward_features(x)
        want = [out["x_norm_clstoken"], out["x_norm_patchtokens"], *([out["x_norm_regtokens"]] if r else [])]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            close(torch.from_numpy(g), w)
        side = json.loads(dest.with_name(dest.name + ".json").read_text())
        n = (size // model.patch_size) ** 2
        assert (side["image_size"], side["inputs"], side["outputs"]) == (size, {"pixel_values": ["batch", 3, size, size]}, {
            "cls_token": ["batch", d], "patch_tokens": ["batch", n, d], **({"register_tokens": ["batch", r, d]} if r else {})})
        assert side["lvd_backbone"] == model.arch_kwargs and 0 <= side["max_abs_diff_vs_torch_fp32"] <= 1e-4
        assert exported.notes[0].startswith(f"the graph takes {size} x {size} px images (any batch)")


def test_the_onnx_usage_runs_on_a_photograph_as_lvd_evaluates_it(tmp_path, monkeypatch):
    model = make(img_size=42, patch_size=14, num_register_tokens=4)
    exported = export_model(model, "onnx", tmp_path / "m.onnx")
    Image.fromarray(skdata.astronaut()).resize((300, 200)).save(tmp_path / "photo.jpg", quality=95)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(exported.usage, scope)  # the lines `lvd export` prints
    with torch.no_grad():
        out = model.forward_features(eval_transform(Image.open(tmp_path / "photo.jpg"), 42)[None])
    close(torch.from_numpy(scope["cls_token"]), out["x_norm_clstoken"])
    close(torch.from_numpy(scope["register_tokens"]), out["x_norm_regtokens"])


def test_an_onnx_graph_that_differs_from_the_model_is_not_kept(tmp_path, monkeypatch):
    from training.export import onnx_format

    monkeypatch.setattr(onnx_format, "TOLERANCE", 0.0)  # float32 graphs differ in the last bits: refused now
    with pytest.raises(onnx_format.ExportMismatch, match="nothing was written"):
        export_model(make(), "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
