"""The `train` configurations of the optional follow-up stages (`train.highres`, `train.distill`): what they take
from the pretrain section, what they set, and the problems reported when the configuration is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.config import ConfigError, load_config
from training.schedules import derive

BUNDLE = Path("/runs/r/stages/pretrain/teacher_checkpoint.safetensors")


def test_highres_stage_continues_the_pretrain_section_at_the_new_resolution():
    train = load_config(None, ["train.highres.enabled=true", "train.highres.overrides={optim: {base_lr: 1.0e-4}}",
                               "train.distill.enabled=true", "train.optim.epochs=50"]).train
    hr = train.highres_stage(BUNDLE)
    assert (hr.mode, hr.max_steps, hr.crops.global_crops_size, hr.crops.local_crops_size) == ("highres", 10_000, 518, 98)
    assert hr.student.pretrained_weights == BUNDLE and hr.student.arch == train.student.arch
    assert (hr.optim.base_lr, hr.optim.epochs) == (1e-4, 50)  # the override, and the rest of the pretrain section
    assert not hr.highres.enabled and not hr.distill.enabled  # a stage never chains further
    d = derive(hr, world_size=16)  # paper: 10k iterations at 518 px, every schedule compressed into them
    assert (d.total_iters, d.run_iters, d.warmup_iters, d.global_patches) == (10_000, 10_000, 2_000, 37 * 37)


def test_distill_stage_builds_a_fresh_smaller_student_with_the_teachers_patch_size():
    train = load_config(None, ["train.distill.enabled=true", "train.student.arch=vit_giant2",
                               "train.student.ffn_layer=swiglufused", "train.student.drop_path_rate=0.4",
                               "train.distill.overrides={student: {num_register_tokens: 4}, batch_size_per_gpu: 8}"]).train
    d = train.distill_stage(BUNDLE)
    assert (d.mode, d.teacher_weights) == ("distill", BUNDLE)
    s = d.student
    assert (s.arch, s.patch_size, s.ffn_layer, s.drop_path_rate, s.num_register_tokens) == ("vit_small", 14, "mlp", 0.0, 4)
    assert s.model_fields_set == {"arch", "patch_size", "drop_path_rate", "num_register_tokens"}  # registry options kept
    assert (d.batch_size_per_gpu, d.crops, d.optim) == (8, train.crops, train.optim)


def test_follow_up_problems_are_reported_when_the_configuration_loads():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.highres.enabled=true", "train.highres.global_crops_size=500",
                           "train.distill.enabled=true", "train.distill.overrides={mode: pretrain}"])
    text = str(err.value)
    assert "highres: crops.global_crops_size=500 is not a multiple of student.patch_size=14" in text
    assert "distill: overrides may not set ['mode'] (the stage sets them)" in text
    with pytest.raises(ConfigError, match=r"distill: the student's patch size must be the teacher's \(14\)"):
        load_config(None, ["train.distill.enabled=true", "train.distill.overrides={student: {patch_size: 16}, "
                           "crops: {global_crops_size: 224, local_crops_size: 96}}"])
    with pytest.raises(ConfigError, match=r"distill: student\.foo: Extra inputs are not permitted"):
        load_config(None, ["train.distill.enabled=true", "train.distill.overrides={student: {foo: 1}}"])
    load_config(None, ["train.highres.global_crops_size=500"])  # a disabled stage is not checked
