"""Backbone: released key names and shapes, strict official-format loads, features equal to a naive forward."""

from __future__ import annotations

import naive_vit
import pytest
import torch
from torch.testing import assert_close

from training.checkpoint import (
    BUNDLE_ORDER,
    export_backbone,
    export_bundle,
    load_backbone,
    load_bundle,
    load_official_state_dict,
    official_state_dict,
)
from training.registry import ARCHS, build_backbone

# (arch, embed dim, depth, SwiGLU hidden width of the released checkpoint)
RELEASED = [("vit_small", 384, 12, None), ("vit_base", 768, 12, None), ("vit_large", 1024, 24, None),
            ("vit_giant2", 1536, 40, 4096)]


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize(("arch", "dim", "depth", "swiglu"), RELEASED)
def test_key_names_and_shapes_match_released(arch, dim, depth, swiglu, registers):
    with torch.device("meta"):  # shapes only: no memory for ViT-g
        model = build_backbone(arch, 14, 518, init_values=1.0, num_register_tokens=registers)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == naive_vit.released_shapes(dim, depth, registers=registers, swiglu_hidden=swiglu)


@pytest.mark.parametrize(("registers", "offset", "antialias"), [(0, 0.1, False), (4, 0.0, True)])
def test_official_state_dict_strict_load_and_features_equal_naive(registers, offset, antialias):
    state = naive_vit.random_state(naive_vit.released_shapes(384, 12, registers=registers), seed=registers)
    model = build_backbone("vit_small", 14, 518, init_values=1.0, num_register_tokens=registers,
                           interpolate_offset=offset, interpolate_antialias=antialias).double().eval()
    load_official_state_dict(model, state, strict=True)
    img = torch.randn(2, 3, 112, 98, dtype=torch.float64)  # 8 x 7 patches: pos-embed 37x37 -> 8x7
    masks = torch.rand(2, 56) < 0.3
    with torch.no_grad():
        got = model.forward_features(img, masks=masks)
    want, _ = naive_vit.forward(state, img, heads=6, masks=masks, offset=offset, antialias=antialias)
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        assert_close(got[key], want[key], rtol=1e-9, atol=1e-9)
    assert got["x_norm_regtokens"].shape == (2, registers, 384)
    assert_close(model(img, masks=masks), want["x_norm_clstoken"], rtol=1e-9, atol=1e-9)  # forward: normed cls


def _pico_state(registers=0, swiglu=False, grid=7, seed=0):
    hidden = 256 if swiglu else None  # (int(2/3 * 384) + 7) // 8 * 8
    return naive_vit.random_state(naive_vit.released_shapes(96, 4, patch=4, grid=grid, registers=registers,
                                                            swiglu_hidden=hidden), seed=seed)


def test_swiglu_registers_and_list_forward_equal_naive():
    state = _pico_state(registers=4, swiglu=True)
    model = build_backbone("vit_pico_reg4_swiglu", 4, 28, init_values=1.0).double().eval()
    load_official_state_dict(model, state, strict=True)
    globals_, locals_ = torch.randn(4, 3, 28, 28, dtype=torch.float64), torch.randn(6, 3, 12, 12, dtype=torch.float64)
    masks = torch.rand(4, 49) < 0.4
    with torch.no_grad():
        packed = model.forward_features([globals_, locals_], [masks, None])
    for out, img, m in zip(packed, [globals_, locals_], [masks, None], strict=True):
        want, _ = naive_vit.forward(state, img, heads=3, masks=m, offset=0.0, antialias=True)
        assert_close(out["x_norm_patchtokens"], want["x_norm_patchtokens"], rtol=1e-9, atol=1e-9)
        assert_close(out["x_norm_regtokens"], want["x_norm_regtokens"], rtol=1e-9, atol=1e-9)


def test_get_intermediate_layers_equal_naive():
    state = _pico_state(seed=3)
    model = build_backbone("vit_pico", 4, 28, init_values=1.0).double().eval()
    load_official_state_dict(model, state, strict=True)
    img = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        outs = model.get_intermediate_layers(img, n=[0, 2], reshape=True, return_class_token=True)
        raw = model.get_intermediate_layers(img, n=2, norm=False)
    _, blocks = naive_vit.forward(state, img, heads=3)
    for (patches, cls), i in zip(outs, [0, 2], strict=True):
        normed = naive_vit.layer_norm(blocks[i], state["norm.weight"], state["norm.bias"])
        assert patches.shape == (2, 96, 7, 7)
        assert_close(patches, normed[:, 1:].reshape(2, 7, 7, 96).permute(0, 3, 1, 2))
        assert_close(cls, normed[:, 0])
    assert_close(raw[0], blocks[2][:, 1:])
    assert_close(raw[1], blocks[3][:, 1:])


def test_pos_embed_interpolation_shapes():
    model = build_backbone("vit_small", 14, 518).eval()
    for px, grid in [(224, 16), (98, 7), (518, 37)]:
        tokens = model.prepare_tokens_with_masks(torch.randn(1, 3, px, px))
        assert tokens.shape == (1, grid * grid + 1, 384)
    assert model.interpolate_pos_encoding(torch.zeros(1, 257, 384), 224, 224).shape == (1, 257, 384)


def test_pos_embed_init_draws_the_reference_values_and_another_std_scales_the_same_draw():
    # The reference's trunc_normal_(std=0.02) cuts at its default +-2, i.e. +-100 std: the backbone's scaled cut.
    ref, ours = torch.empty(1, 17, 64), torch.empty(1, 17, 64)
    torch.manual_seed(3)
    torch.nn.init.trunc_normal_(ref, std=0.02)
    torch.manual_seed(3)
    torch.nn.init.trunc_normal_(ours, std=0.02, a=-100 * 0.02, b=100 * 0.02)
    assert torch.equal(ref, ours)
    models = {}
    for std in (0.02, 1.0):
        torch.manual_seed(0)
        models[std] = build_backbone("vit_pico", 7, 28, pos_embed_init_std=std).state_dict()
    assert_close(models[1.0]["pos_embed"], models[0.02]["pos_embed"] * 50, rtol=1e-6, atol=0)
    assert 0.9 < models[1.0]["pos_embed"].std().item() < 1.1
    assert all(torch.equal(v, models[0.02][k]) for k, v in models[1.0].items() if k != "pos_embed")  # nothing else


def test_a_bundle_loads_in_one_module_order(tmp_path):
    """safetensors returns a file's metadata in an order that changes from call to call (a Rust HashMap); a bundle's
    modules must come back in one order all the same, since a distillation teacher's parameter order follows it (two
    ranks with different orders got swapped teacher tensors from DDP's start-up broadcast)."""
    from training.layers.dino_head import DINOHead

    modules = {"ibot_head": DINOHead(96, 48, hidden_dim=32, bottleneck_dim=16),
               "backbone": build_backbone("vit_pico", 4, 16, init_values=1e-5),
               "dino_head": DINOHead(96, 64, hidden_dim=32, bottleneck_dim=16)}
    path = export_bundle(modules, tmp_path / "bundle.safetensors")
    orders = {tuple(load_bundle(path)) for _ in range(12)}  # a random order would show up in 12 loads (1 - 6^-11)
    assert orders == {BUNDLE_ORDER}
    loaded = load_bundle(path)
    for name, module in modules.items():
        assert all(torch.equal(v, loaded[name].state_dict()[k]) for k, v in module.state_dict().items()), name


def test_chunked_export_is_flat_and_round_trips(tmp_path):
    chunked = build_backbone("vit_pico", 4, 28, block_chunks=2, init_values=1e-5).eval()
    assert "blocks.1.2.attn.qkv.weight" in chunked.state_dict()
    state = official_state_dict(chunked)
    assert set(state) == set(naive_vit.released_shapes(96, 4, patch=4, grid=7))
    path = export_backbone(chunked, tmp_path / "teacher_backbone.safetensors")
    from_st = load_backbone(path)
    pth_state = torch.load(path.with_suffix(".pth"), weights_only=True)
    from_pth = load_backbone(path.with_suffix(".pth"), arch="vit_pico")
    img = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        want = chunked(img)
        assert_close(from_st(img), want, rtol=0, atol=0)
        assert_close(from_pth(img), want, rtol=0, atol=0)
    assert set(pth_state) == set(state)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_registry_forward_backward_every_param_gets_grad(arch):
    big = ARCHS[arch]["embed_dim"] > 384
    device = torch.device("meta") if big else torch.device("cpu")  # big archs: graph and shapes, no compute
    with device:
        model = build_backbone(arch, 14, 56, drop_path_rate=0.3, drop_path_uniform=True, init_values=1e-5).train()
        globals_, locals_ = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)
        masks = torch.zeros(4, 16, dtype=torch.bool)
        masks[0, :5] = True
    outs = model.forward_features([globals_, locals_], [masks, None])
    loss = sum(o["x_norm_clstoken"].float().pow(2).mean() + o["x_norm_patchtokens"].float().pow(2).mean() for o in outs)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert outs[0]["x_norm_patchtokens"].shape == (4, 16, ARCHS[arch]["embed_dim"])
    if not big:
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert model.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("block_chunks", [0, 2])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(block_chunks):
    """Recomputed activations (packed global + local crops, masks, efficient drop path at 0.5 so samples are really
    dropped) give bit-equal outputs and gradients; without grad (the teacher) nothing is checkpointed."""

    def run(recompute: bool):
        torch.manual_seed(0)
        model = build_backbone("vit_pico", 4, 16, drop_path_rate=0.5, drop_path_uniform=True, init_values=1e-5,
                               block_chunks=block_chunks).train()  # fmt: skip
        model.activation_checkpointing = recompute
        torch.manual_seed(1)
        x = [torch.randn(6, 3, 16, 16), torch.randn(8, 3, 8, 8)]
        masks = torch.rand(6, 16) < 0.4
        outs = model.forward_features(x, [masks, None])
        loss = sum(o["x_norm_clstoken"].pow(2).mean() + o["x_norm_patchtokens"].pow(2).mean() for o in outs)
        loss.backward()
        return [o["x_norm_patchtokens"].detach() for o in outs], {n: p.grad for n, p in model.named_parameters()}

    outs_a, grads_a = run(False)
    outs_b, grads_b = run(True)
    for a, b in zip(outs_a, outs_b, strict=True):
        assert torch.equal(a, b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    # the switch is real: the checkpointed graph keeps fewer saved tensors
    model = build_backbone("vit_pico", 4, 16, block_chunks=block_chunks).train()
    counts = {False: 0, True: 0}

    def count(t):
        counts[model.activation_checkpointing] += 1
        return t

    for recompute in (False, True):
        model.activation_checkpointing = recompute
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            model.forward_features(torch.randn(2, 3, 16, 16))
    assert counts[True] < counts[False] / 3, counts


@pytest.mark.parametrize(("arch", "block_chunks", "drop_path"), [("vit_pico_reg4_swiglu", 0, 0.0),
                                                                 ("vit_pico", 2, 0.0), ("vit_pico", 0, 0.5)])
def test_last_block_on_selected_rows_equals_the_full_forward(arch, block_chunks, drop_path):
    """`patch_rows`: the class tokens and the selected patch tokens (registers skipped) with the values and gradients
    of the full forward; with drop path in the last block every row is computed (the same draws)."""

    def run(select: bool):
        torch.manual_seed(0)
        model = build_backbone(arch, 4, 16, drop_path_rate=drop_path, drop_path_uniform=True, init_values=0.5,
                               block_chunks=block_chunks).double().train()
        torch.manual_seed(1)
        x = [torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randn(8, 3, 8, 8, dtype=torch.float64)]
        masks = torch.rand(6, 16) < 0.4
        sel = masks.flatten().nonzero().flatten()  # 6 x 16 patches of the global crops
        torch.manual_seed(2)
        if select:
            outs = model.forward_features(x, [masks, None], patch_rows=[sel, sel[:0]])
            got = [outs[0]["x_norm_clstoken"], outs[1]["x_norm_clstoken"], outs[0]["x_norm_patchtokens_selected"]]
        else:
            outs = model.forward_features(x, [masks, None])
            got = [outs[0]["x_norm_clstoken"], outs[1]["x_norm_clstoken"],
                   outs[0]["x_norm_patchtokens"].flatten(0, 1)[sel]]
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in got).backward()
        return got, {n: p.grad for n, p in model.named_parameters()}, len(sel)

    (full, full_grads, n_sel), (part, part_grads, _) = run(False), run(True)
    assert part[2].shape == (n_sel, 96) and n_sel > 10
    for a, b in zip(full, part, strict=True):
        assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert full_grads.keys() == part_grads.keys()
    for k in full_grads:
        assert_close(part_grads[k], full_grads[k], rtol=1e-9, atol=1e-12)
