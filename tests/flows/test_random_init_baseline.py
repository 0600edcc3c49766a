"""The evaluation's random-init baseline: the student's architecture and initialisation, untrained, LayerScale off."""

from __future__ import annotations

import torch

from flows.models import random_init_model
from infra.config import load_config
from training.meta_arch import build_student

STUDENT = ["train.student.arch=vit_pico", "train.student.patch_size=7", "train.crops.global_crops_size=28",
           "train.crops.local_crops_size=14", "train.student.layerscale=1.0e-5", "train.student.num_register_tokens=2",
           "train.student.pos_embed_init_std=1.0"]


def test_baseline_is_the_students_initialisation_with_layerscale_off():
    train = load_config(None, STUDENT).train
    baseline = random_init_model(train, seed=5)
    torch.manual_seed(5)
    student = build_student(train).backbone
    ours, theirs = baseline.model.state_dict(), student.state_dict()
    gammas = {k for k in theirs if k.endswith((".ls1.gamma", ".ls2.gamma"))}
    assert len(gammas) == 2 * 4 and set(ours) == set(theirs) - gammas  # vit_pico: 4 blocks, LayerScale off
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items())  # registers, pos_embed at std 1.0: same draw
    assert 0.8 < ours["pos_embed"].std().item() < 1.2
    fp = baseline.fingerprint
    assert fp.startswith("vit:vit_pico:random:seed=5:") and '"pos_embed_init_std": 1.0' in fp
    assert '"num_register_tokens": 2' in fp and '"image_size": 28' in fp

    # Why LayerScale is off: at 1e-5 the class token barely depends on the image (kNN at chance).
    x = torch.randn(8, 3, 28, 28)
    with torch.no_grad():
        spread = {name: (f - f.mean(0)).norm(dim=1).max().item() / f.mean(0).norm().item()
                  for name, f in (("student", student.eval()(x)), ("baseline", baseline.model(x)))}
    assert spread["student"] < 1e-5 and spread["baseline"] > 1e-3, spread  # measured: 1e-7, 7e-3
