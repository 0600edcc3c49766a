"""Meta-architecture: sequence packing equals separate forwards, stochastic depth, EMA update, loss wiring."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config
from torch.testing import assert_close

from training.data import build_source
from training.layers import Block
from training.meta_arch import NonFiniteLossError, SSLMetaArch, check_finite
from training.module import DinoV2DataModule
from training.registry import build_backbone


@pytest.mark.parametrize("train_mode", [False, True])
def test_sequence_packing_equals_separate_forwards(train_mode):
    model = build_backbone("vit_pico_reg4_swiglu", 4, 16, init_values=0.5).train(train_mode)
    g, loc = torch.randn(6, 3, 16, 16), torch.randn(9, 3, 8, 8)
    masks = torch.rand(6, 16) < 0.3
    packed = model.forward_features([g, loc], [masks, None])
    separate = [model.forward_features(g, masks=masks), model.forward_features(loc)]
    for p, s in zip(packed, separate, strict=True):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert_close(p[key], s[key], rtol=1e-5, atol=1e-5)


def _batch(cfg, image_folder, step=0):
    return DinoV2DataModule(build_source(image_folder), cfg, seed=1).make_stream().batch(step)


@pytest.mark.parametrize("separate_head", [False, True])
def test_meta_losses_with_and_without_packing_are_equal(image_folder, separate_head):
    cfgs = [tiny_config(**{"sequence_packing": p, "student.drop_path_rate": 0.0, "ibot.separate_head": separate_head})
            for p in (True, False)]
    batch = _batch(cfgs[0], image_folder)
    losses = []
    for cfg in cfgs:
        torch.manual_seed(0)
        meta = SSLMetaArch(cfg).train()
        terms, _ = meta.forward_losses(batch, teacher_temp=0.04)
        losses.append(torch.stack(list(terms.values())))
        assert list(terms) == ["dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"]
    assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_efficient_drop_path_equals_subset_formula():
    torch.manual_seed(0)
    blk = Block(16, 2, drop_path=0.5, init_values=0.3).train()
    x = torch.randn(8, 5, 16)
    torch.manual_seed(1)
    got = blk(x)
    torch.manual_seed(1)  # the same draws, by hand: residual on int(8 * 0.5) = 4 images, scaled by 8 / 4
    idx = torch.randperm(8)[:4]
    flat = x.reshape(-1, 16)
    mid = flat.clone()
    mid.view(8, 5, 16)[idx] += 2.0 * blk.attn_branch(x[idx].reshape(-1, 16), ((4, 5),)).view(4, 5, 16)
    idx2 = torch.randperm(8)[:4]
    want = mid.view(8, 5, 16).clone()
    want[idx2] += 2.0 * blk.ffn_branch(mid.view(8, 5, 16)[idx2].reshape(-1, 16), ((4, 5),)).view(4, 5, 16)
    assert_close(got, want, rtol=1e-6, atol=1e-6)
    blk.sample_drop_ratio = 0.05  # (0, 0.1]: standard per-sample drop path
    blk.drop_path1.drop_prob = 0.05
    torch.manual_seed(2)
    got = blk(x)
    torch.manual_seed(2)
    keep1 = torch.empty(8).bernoulli_(0.95) / 0.95
    mid = x + blk.attn_branch(x.reshape(-1, 16), ((8, 5),)).view(8, 5, 16) * keep1.view(8, 1, 1)
    keep2 = torch.empty(8).bernoulli_(0.95) / 0.95
    want = mid + blk.ffn_branch(mid.reshape(-1, 16), ((8, 5),)).view(8, 5, 16) * keep2.view(8, 1, 1)
    assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_teacher_update_is_ema_over_backbone_and_heads():
    meta = SSLMetaArch(tiny_config(**{"ibot.separate_head": True}))
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in meta.teacher.state_dict().items()}
    student = meta.student.state_dict()
    meta.update_teacher(0.9)
    after = meta.teacher.state_dict()
    assert set(after) == set(student) and {k.split(".")[0] for k in after} == {"backbone", "dino_head", "ibot_head"}
    for k in after:
        assert_close(after[k], 0.9 * before[k] + 0.1 * student[k], rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in meta.teacher.parameters())


def test_dino_global_loss_pairs_swapped_views(image_folder):
    cfg = tiny_config(**{"student.drop_path_rate": 0.0})
    meta = SSLMetaArch(cfg).train()
    batch = _batch(cfg, image_folder)
    t = meta.teacher_targets(batch, 0.04)
    s = meta.student_outputs(batch)
    terms = meta.loss_terms(s, t, batch)
    b = cfg.batch_size_per_gpu
    with torch.no_grad():  # naive: teacher view 2 supervises student view 1 and vice versa, 18 -> 6 pairs here
        teacher_logits = meta.teacher.dino_head(meta.teacher.backbone(batch["collated_global_crops"]))
    p = torch.softmax(teacher_logits / 0.04, -1)  # step 0: the center is still zero
    lsm = torch.log_softmax(s["global_logits"] / 0.1, -1)
    want = -((p[b:] * lsm[:b]).sum(-1).mean() + (p[:b] * lsm[b:]).sum(-1).mean()) / 6
    assert_close(terms["dino_global_crops_loss"], want, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_names_the_term():
    terms = {"dino_local_crops_loss": torch.tensor(1.0), "koleo_loss": torch.tensor(float("nan")),
             "ibot_loss": torch.tensor(float("inf"))}
    with pytest.raises(NonFiniteLossError, match=r"step 7: koleo_loss=nan, ibot_loss=inf"):
        check_finite(terms, step=7)
    check_finite({"dino_local_crops_loss": torch.tensor(1.0)}, step=0)


@pytest.mark.parametrize(("packing", "drop_path"), [(True, 0.0), (False, 0.0), (True, 0.2)])
def test_last_block_on_the_read_rows_gives_the_reference_losses_and_gradients(image_folder, packing, drop_path):
    """The backbones' last block computed for the class tokens and iBOT's patches only (`last_block_rows`, the
    default) gives the losses and student gradients of every token through every block (float64)."""
    cfg = tiny_config(**{"sequence_packing": packing, "student.drop_path_rate": drop_path})
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in _batch(cfg, image_folder).items()}
    results = []
    for rows in (False, True):
        torch.manual_seed(0)
        meta = SSLMetaArch(cfg).double().train()
        meta.last_block_rows = rows
        torch.manual_seed(1)
        terms, _ = meta.forward_losses(batch, teacher_temp=0.04)
        sum(terms.values()).backward()
        results.append((torch.stack(list(terms.values())), {n: p.grad for n, p in meta.student.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert want_grads.keys() == got_grads.keys()
    for k in want_grads:
        assert_close(got_grads[k], want_grads[k], rtol=1e-8, atol=1e-12)
