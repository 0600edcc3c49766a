"""The collapse guard on the teacher's prototype usage entropy: it names the value, warns or stops a collapsed teacher,
and lets a healthy one train."""

from __future__ import annotations

import logging
import math

import lightning as L
import pytest
import torch
from tiny import tiny_config

from infra.config.train import CollapseGuardConfig
from training.data import build_source
from training.meta_arch import TeacherCollapseError, _usage_stats, check_collapse
from training.metrics import read_csv
from training.module import STEP_SEED_SALT, DinoV2DataModule, DinoV2Module
from training.pretrain import pretrain
from training.seeding import reseed

K = 64


def test_usage_entropy_and_the_guard_verdicts():
    collapsed = torch.zeros(32, K)
    collapsed[:, 3] = 1.0  # every target on one prototype
    healthy = torch.zeros(32, K)
    healthy[torch.arange(32), torch.arange(32) % 16] = 1.0  # 16 prototypes used equally
    c, h = _usage_stats(collapsed), _usage_stats(healthy)
    assert float(c["proto_entropy"]) == 0.0
    assert float(h["proto_entropy"]) == pytest.approx(math.log(16), abs=1e-6)
    stop = CollapseGuardConfig(min_proto_entropy=1.5, action="stop")
    with pytest.raises(TeacherCollapseError, match=r"step 7: prototype usage entropy proto_entropy=0\.0000 nats is "
                                                   r"below train\.collapse_guard\.min_proto_entropy=1\.5 \(about 1\.0 of "
                                                   r"the 64 prototypes in use; uniform usage is log K = 4\.159\)"):
        check_collapse(c, 7, stop, K)
    assert check_collapse(h, 7, stop, K) is None  # log 16 = 2.77 > 1.5
    warn = CollapseGuardConfig(min_proto_entropy=3.0, action="warn", start_step=5)
    assert "proto_entropy=2.7726" in check_collapse(h, 5, warn, K)  # below 3.0: a warning, no exception
    assert check_collapse(h, 4, warn, K) is None  # before start_step
    assert check_collapse(c, 7, CollapseGuardConfig(), K) is None  # off by default


class CollapseTeacher(L.Callback):
    """Every image gets the same teacher class token (final norm: weight 0, bias a fixed vector), as after a
    collapse; with the teacher temperature at 0.04 its targets all peak on the same prototypes."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        collapse(pl_module.meta)


def collapse(meta) -> None:
    norm = meta.teacher.backbone.norm
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(0)))


def _step0_entropy(cfg, image_folder, collapsed: bool) -> float:
    """proto_entropy of step 0 computed outside the trainer (same init, batch and RNG)."""
    module = DinoV2Module(cfg, seed=0)
    if collapsed:
        collapse(module.meta)
    batch = DinoV2DataModule(build_source(image_folder), cfg, seed=0).make_stream(0).batch(0)
    reseed(0, 0, 0, STEP_SEED_SALT)
    return float(module.meta.train().teacher_targets(batch, cfg.teacher.warmup_teacher_temp).stats["proto_entropy"])


def test_a_collapsed_teacher_is_stopped_and_a_healthy_one_trains(image_folder, tmp_path):
    guard = {"collapse_guard.min_proto_entropy": 0.5, "collapse_guard.action": "stop", "max_steps": 3}
    cfg = tiny_config(**guard)
    healthy = pretrain(image_folder, tmp_path / "healthy", cfg, seed=0)
    rows = read_csv(healthy.metrics_csv)
    assert healthy.steps == 3 and min(r["proto_entropy"] for r in rows) >= 0.5
    assert rows[0]["proto_entropy"] == pytest.approx(_step0_entropy(cfg, image_folder, False), abs=1e-6)
    value = _step0_entropy(cfg, image_folder, True)
    assert value < 0.5
    with pytest.raises(TeacherCollapseError, match=rf"step 0: .* proto_entropy={value:.4f} nats is below "
                                                   r"train\.collapse_guard\.min_proto_entropy=0\.5 "):
        pretrain(image_folder, tmp_path / "collapsed", cfg, seed=0, callbacks=[CollapseTeacher()])


def test_warn_mode_logs_once_and_trains_on(image_folder, tmp_path, caplog):
    cfg = tiny_config(**{"collapse_guard.min_proto_entropy": 0.5, "max_steps": 2})  # action: warn (default)
    value = _step0_entropy(cfg, image_folder, True)
    with caplog.at_level(logging.WARNING, logger="training.module"):
        result = pretrain(image_folder, tmp_path / "warn", cfg, seed=0, callbacks=[CollapseTeacher()])
    assert result.steps == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "training.module"]
    assert len(warnings) == 1 and f"step 0: prototype usage entropy proto_entropy={value:.4f}" in warnings[0]
