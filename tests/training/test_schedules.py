"""Schedules (reference CosineScheduler semantics and end points), lr scaling, parameter groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
from torch.testing import assert_close

from infra.config.train import TrainConfig
from training.meta_arch import SSLMetaArch
from training.param_groups import apply_optim_schedule
from training.schedules import CosineScheduler, Schedules, derive, scaled_lr


def reference_array(base, final, total, warmup=0, start=0.0, freeze=0):
    """The reference builds the whole schedule as one numpy array."""
    iters = np.arange(total - warmup - freeze)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((np.zeros(freeze), np.linspace(start, base, warmup), cosine))


@pytest.mark.parametrize(("base", "final", "total", "warmup", "start", "freeze"),
                         [(1e-3, 1e-6, 100, 10, 0.0, 0), (0.04, 0.4, 37, 0, 0.0, 0), (0.07, 0.07, 30, 30, 0.04, 0),
                          (2.0, 0.5, 50, 7, 0.3, 5), (1.0, 0.0, 5, 1, 0.2, 0)])
def test_cosine_scheduler_equals_reference_array(base, final, total, warmup, start, freeze):
    sched = CosineScheduler(base, final, total, warmup_iters=warmup, start_warmup_value=start, freeze_iters=freeze)
    want = reference_array(base, final, total, warmup, start, freeze)
    got = np.array([sched[i] for i in range(total)])
    assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert sched[total] == final and sched[10 * total] == final


def test_default_schedule_end_points():
    cfg = TrainConfig()  # ssl_default_config: 100 epochs x 1250, warmup 10 epochs, teacher temp warmup 30 epochs
    d = derive(cfg, world_size=16)  # global batch 1024: lr = base_lr
    s = Schedules(cfg, d)
    assert (d.total_iters, d.warmup_iters, d.teacher_temp_warmup_iters, d.global_batch) == (125000, 12500, 37500, 1024)
    assert s.at(0).lr == 0.0
    assert s.at(12499).lr == pytest.approx(4e-3, rel=1e-12)  # peak at the end of warmup
    assert s.at(124999).lr == pytest.approx(1e-6, rel=1e-3) and s.at(125000).lr == 1e-6
    assert s.at(0).wd == pytest.approx(0.04) and s.at(125000).wd == 0.4  # weight decay increases
    assert s.at(0).momentum == pytest.approx(0.992) and s.at(125000).momentum == 1.0
    assert s.at(0).teacher_temp == pytest.approx(0.04) and s.at(37499).teacher_temp == pytest.approx(0.07)
    assert s.at(37500).teacher_temp == 0.07 and s.at(100000).teacher_temp == 0.07
    assert s.at(1249).last_layer_lr == 0.0 and s.at(1250).last_layer_lr == s.at(1250).lr > 0


def test_lr_scaling_rules_and_highres_compression():
    assert scaled_lr(2e-4, 3072, "sqrt_wrt_1024") == pytest.approx(2e-4 * math.sqrt(3))  # paper: 3.5e-4
    assert scaled_lr(4e-3, 64, "sqrt_wrt_1024") == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 512, "linear_wrt_256") == pytest.approx(2e-3)
    cfg = TrainConfig.model_validate({"mode": "highres", "max_steps": 1000, "student": {"pretrained_weights": "w"}})
    d = derive(cfg, 1)  # every epoch-based length compressed into the 1000 steps
    assert (d.total_iters, d.run_iters, d.warmup_iters, d.teacher_temp_warmup_iters) == (1000, 1000, 100, 300)


def test_param_groups_layer_decay_patch_embed_and_no_wd():
    cfg = TrainConfig.model_validate({"student": {"arch": "vit_pico", "patch_size": 4}, "crops": {
        "global_crops_size": 16, "local_crops_size": 8}, "dino": {"head_n_prototypes": 32, "head_hidden_dim": 16,
                                                                  "head_bottleneck_dim": 8}})
    meta = SSLMetaArch(cfg)
    groups = meta.param_groups()
    by_name = {n: g for g in groups for n in g["names"]}
    depth, decay = 4, 0.9
    assert by_name["blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(decay ** depth)
    assert by_name["blocks.3.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(decay ** 1)
    assert by_name["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(decay ** (depth + 1) * 0.2)
    assert by_name["cls_token"]["lr_multiplier"] == pytest.approx(decay ** (depth + 1))
    assert by_name["norm.weight"]["lr_multiplier"] == 1.0 and by_name["mlp.0.weight"]["lr_multiplier"] == 1.0
    for name in ("blocks.0.attn.qkv.bias", "blocks.1.norm1.weight", "blocks.2.ls1.gamma", "norm.bias"):
        assert by_name[name]["wd_multiplier"] == 0.0
    assert by_name["blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert by_name["last_layer.weight_v"]["is_last_layer"] and not by_name["mlp.4.weight"]["is_last_layer"]
    n_params = sum(1 for p in meta.student.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_params
    assert len({(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups}) == len(groups)

    import torch

    opt = torch.optim.AdamW(groups)
    apply_optim_schedule(opt, lr=1.0, wd=0.5, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else g["lr_multiplier"])
        assert g["weight_decay"] == 0.5 * g["wd_multiplier"]
