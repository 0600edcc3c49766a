"""Official training checkpoints in: built here in the reference's key layouts (released flat state dict, the
`{"teacher": ...}` of `eval/<iter>/teacher_checkpoint.pth`, a whole-model `{"model": ...}` checkpoint with `teacher.` /
`student.` prefixes and DDP / FSDP wrapper names), block chunks (`blocks.<chunk>.<i>.*`, the vitl14 / vitg14 recipes'
`block_chunks: 4`) or flat, with and without registers. Features and heads equal the weights they were built from;
one of them continues pretraining as `train.student.pretrained_weights`."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from tiny import tiny_config

from training.checkpoint import load_backbone, official_state_dict, read_checkpoint
from training.layers import DINOHead
from training.vision_transformer import DinoVisionTransformer

DEPTH, CHUNKS = 4, 2


def backbone(registers: int, seed: int = 0, **kw) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    model = DinoVisionTransformer(img_size=16, patch_size=4, embed_dim=96, depth=DEPTH, num_heads=3, init_values=1e-5,
                                  num_register_tokens=registers, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def heads(seed: int) -> dict[str, DINOHead]:
    torch.manual_seed(seed)  # the tiny training config's head sizes (tests/training/tiny.py)
    return {"dino_head": DINOHead(96, 64, 3, 32, 16), "ibot_head": DINOHead(96, 48, 3, 32, 16)}


def chunked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`blocks.<i>.` -> `blocks.<chunk>.<i>.`, as the reference's BlockChunk names them (written out here)."""
    per = DEPTH // CHUNKS
    return {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) // per}.{m[1]}.", k): v for k, v in state.items()}


def ssl_model(model: DinoVisionTransformer, chunks: bool, seed: int) -> dict[str, torch.Tensor]:
    """A teacher (or student) ModuleDict's state: backbone., dino_head., ibot_head."""
    state = official_state_dict(model)
    out = {f"backbone.{k}": v for k, v in (chunked(state) if chunks else state).items()}
    for name, head in heads(seed).items():
        out.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
    return out


def write(layout: str, model: DinoVisionTransformer, chunks: bool, path) -> None:
    teacher = ssl_model(model, chunks, seed=1)
    if layout == "released":
        obj = chunked(official_state_dict(model)) if chunks else official_state_dict(model)
    elif layout == "teacher_checkpoint":  # dinov2 train.py do_test: {"teacher": model.teacher.state_dict()}
        obj = {"teacher": teacher}
    else:  # the whole SSL model (one process), wrapper names included; the student differs from the teacher
        student = ssl_model(backbone(model.num_register_tokens, seed=7), chunks, seed=8)
        wrap = {k.replace("backbone.", "backbone._fsdp_wrapped_module.", 1): v for k, v in teacher.items()}
        obj = {"model": {**{f"module.teacher.{k}": v for k, v in wrap.items()},
                         **{f"module.student.{k}": v for k, v in student.items()}},
               "optimizer": {"state": {}, "param_groups": []}, "iteration": 12499}
    torch.save(obj, path)


@pytest.mark.parametrize("layout", ["released", "teacher_checkpoint", "training"])
@pytest.mark.parametrize("chunks", [False, True])
@pytest.mark.parametrize("registers", [0, 4])
def test_official_layouts_load_with_equal_features_and_heads(layout, chunks, registers, tmp_path):
    model = backbone(registers)  # the reference's SSL defaults: offset 0.1, no antialias
    write(layout, model, chunks, tmp_path / "ckpt.pth")
    ck = read_checkpoint(tmp_path / "ckpt.pth")
    assert ck.layout == "official" and set(ck.backbone) == set(official_state_dict(model))
    assert set(ck.heads) == (set() if layout == "released" else {"dino_head", "ibot_head"})
    for name, head in heads(1).items():
        if name in ck.heads:
            for k, v in head.state_dict().items():
                torch.testing.assert_close(ck.heads[name][k], v, atol=0, rtol=0)
    # The architecture from the tensors; the resizing from the options (registers alone would pick the hub's 0 / true)
    loaded = load_backbone(tmp_path / "ckpt.pth", interpolate_offset=0.1, interpolate_antialias=False)
    assert loaded.arch_kwargs == {**model.arch_kwargs, "init_values": 1.0}  # LayerScale's values from the weights
    for size in (16, 28):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(loaded.forward_features(x)["x_norm_patchtokens"],
                                       model.forward_features(x)["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)
    default = load_backbone(tmp_path / "ckpt.pth")
    assert (default.interpolate_offset, default.interpolate_antialias) == ((0.0, True) if registers else (0.1, False))


def test_a_register_checkpoint_needs_its_own_offset_at_another_size(tmp_path):
    """An official register model trained with the SSL defaults (offset 0.1, no antialias), read the hub's way
    (offset 0, antialias), gives other features at 28 px; the explicit options give its own."""
    model = backbone(4)
    with torch.no_grad():
        model.pos_embed.normal_()
    write("teacher_checkpoint", model, True, tmp_path / "ckpt.pth")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        own = model(x)
        hub = load_backbone(tmp_path / "ckpt.pth")(x)
        given = load_backbone(tmp_path / "ckpt.pth", interpolate_offset=0.1, interpolate_antialias=False)(x)
    torch.testing.assert_close(given, own, atol=1e-5, rtol=1e-5)
    assert ((hub - own).norm() / own.norm()) > 1e-3


def test_continued_pretraining_from_an_official_teacher_checkpoint(image_folder, tmp_path):
    """`train.student.pretrained_weights` = a chunked official teacher_checkpoint.pth: the student and teacher start
    from its backbone and its DINO and iBOT heads, and training runs on."""
    import lightning as L

    from training.pretrain import pretrain

    model = backbone(0)
    write("teacher_checkpoint", model, True, tmp_path / "teacher_checkpoint.pth")
    start = {}

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            meta = pl_module.meta
            start.update(student=copy.deepcopy(meta.student.state_dict()), teacher=copy.deepcopy(meta.teacher.state_dict()))

    cfg = tiny_config(**{"student.pretrained_weights": str(tmp_path / "teacher_checkpoint.pth"), "student.block_chunks": 2,
                         "ibot.separate_head": True, "max_steps": 2, "student.drop_path_rate": 0.0})
    result = pretrain(image_folder, tmp_path / "run", cfg, seed=0, callbacks=[AtStart()])
    assert result.steps == 2
    want = ssl_model(model, chunks=True, seed=1)  # the student is chunked as the file: the same names
    for part in ("student", "teacher"):
        got = start[part]
        assert set(got) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, atol=0, rtol=0, msg=f"{part}.{k}")
    trained = load_backbone(result.teacher_backbone)
    assert not torch.equal(trained.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)  # it trained on
