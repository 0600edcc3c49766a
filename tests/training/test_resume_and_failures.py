"""The training system end to end on a tiny model: exact resume, exports, NaN detection, modes."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config
from torch.testing import assert_close

from training.checkpoint import load_backbone, load_bundle
from training.meta_arch import NonFiniteLossError
from training.metrics import read_csv
from training.pretrain import pretrain

LOSSES = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")


def test_interrupted_run_resumes_exactly(image_folder, tmp_path):
    cfg = tiny_config()  # 10 steps; drop path 0.2 (efficient variant), masking, centering, all on
    full = pretrain(image_folder, tmp_path / "full", cfg, seed=3)
    part = pretrain(image_folder, tmp_path / "resumed", cfg, seed=3, interrupt_at=5)
    assert part.steps == 5 and part.checkpoint.is_file()
    resumed = pretrain(image_folder, tmp_path / "resumed", cfg, seed=3)
    assert (full.steps, resumed.steps) == (10, 10)
    a, b = read_csv(full.metrics_csv), read_csv(resumed.metrics_csv)
    assert [r["step"] for r in b] == list(range(10))  # no duplicated rows from the interrupted run
    for ra, rb in zip(a[5:], b[5:], strict=True):  # the 5 steps after the resume
        for key in (*LOSSES, "lr", "wd", "momentum", "teacher_temp", "proto_entropy"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(load_backbone(resumed.teacher_backbone)(img), load_backbone(full.teacher_backbone)(img),
                     rtol=1e-6, atol=1e-6)
    ckpt = torch.load(resumed.checkpoint, map_location="cpu", weights_only=True)  # no pickled code inside
    assert ckpt["global_step"] == 10
    assert "meta.dino_loss.centering.center" in ckpt["state_dict"]
    assert 0.0 < full.final["proto_entropy"] <= float(torch.log(torch.tensor(64.0))) + 1e-5
    assert full.images_per_second > 0


def test_non_finite_loss_stops_training_naming_the_term(image_folder, tmp_path, monkeypatch):
    from training.losses import KoLeoLoss

    monkeypatch.setattr(KoLeoLoss, "forward", lambda self, x: x.sum() * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 0: koleo_loss=nan \(") as err:
        pretrain(image_folder, tmp_path / "nan", tiny_config(), seed=0)
    assert "dino_local_crops_loss=" not in str(err.value).split("(all terms")[0]


def test_resume_refuses_a_changed_config(image_folder, tmp_path):
    pretrain(image_folder, tmp_path / "r", tiny_config(), seed=0, interrupt_at=2)
    with pytest.raises(ValueError, match="optim"):
        pretrain(image_folder, tmp_path / "r", tiny_config(**{"optim.base_lr": 1e-2}), seed=0)


def test_distill_and_highres_modes(image_folder, tmp_path):
    teacher_run = pretrain(image_folder, tmp_path / "teacher", tiny_config(**{"ibot.separate_head": True}), seed=0)
    bundle = tmp_path / "teacher" / "teacher_checkpoint.safetensors"
    assert set(load_bundle(bundle)) == {"backbone", "dino_head", "ibot_head"}
    distill = tiny_config(**{"mode": "distill", "teacher_weights": str(bundle), "ibot.separate_head": True,
                             "student.arch": "vit_pico_reg4_swiglu", "student.drop_path_rate": 0.3})
    result = pretrain(image_folder, tmp_path / "student", distill, seed=0)
    rows = read_csv(result.metrics_csv)
    assert {r["n_masked_patches"] for r in rows} == {2 * 4 * 16}  # iBOT on every patch of both views
    exported = load_backbone(result.teacher_backbone)  # the EMA of the student
    assert exported.num_register_tokens == 4
    highres = tiny_config(**{"mode": "highres", "student.pretrained_weights": str(bundle), "max_steps": 4,
                             "crops.global_crops_size": 24, "ibot.separate_head": True})
    hr = pretrain(image_folder, tmp_path / "highres", highres, seed=0)
    assert hr.steps == 4 and load_backbone(hr.teacher_backbone).pos_embed.shape == (1, 1 + 6 * 6, 96)
    assert read_csv(hr.metrics_csv)[-1]["teacher_temp"] == pytest.approx(0.07)  # schedules compressed into 4 steps
    assert teacher_run.steps == 10


def test_a_tampered_resume_checkpoint_is_refused(image_folder, tmp_path):
    import pickle

    from tests.infra.test_untrusted_inputs import _Payload

    data = image_folder
    out = tmp_path / "run"
    pretrain(data, out, tiny_config(), seed=0, interrupt_at=2)
    ckpt = out / "checkpoints" / "last.ckpt"
    marker = tmp_path / "pwned"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["hook"] = _Payload(marker)
    target = ckpt / "checkpoint.pt" if ckpt.is_dir() else ckpt
    torch.save(state, target)
    with pytest.raises(pickle.UnpicklingError):
        pretrain(data, out, tiny_config(), seed=0)
    assert not marker.exists()
