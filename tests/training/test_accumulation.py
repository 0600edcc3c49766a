"""Gradient accumulation (`train.accumulate_grad_batches`): the data order, the global batch and the optimiser step
are those of the larger batch, and a run with accumulation resumes exactly."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_resume_and_failures import assert_same_trajectory
from tiny import tiny_config
from torch.utils.data import DataLoader

from training.data import build_source
from training.module import DinoV2DataModule, DinoV2Module
from training.pretrain import pretrain
from training.schedules import derive


def test_the_global_batch_counts_the_micro_batches():
    d = derive(tiny_config(accumulate_grad_batches=3), world_size=2)
    assert d.global_batch == 4 * 2 * 3
    assert d.lr == derive(tiny_config(batch_size_per_gpu=12), world_size=2).lr


def test_micro_batches_are_the_batches_of_a_wider_run(image_folder):
    """Micro-batch j of rank r with A micro-batches on W ranks is the batch of rank j * W + r of an A x W-rank run
    without accumulation: the same images, crops and masks."""
    cfg = tiny_config(accumulate_grad_batches=2)
    stream = DinoV2DataModule(build_source(image_folder), cfg, seed=0).make_stream(start_step=0, rank=1, world_size=2)
    wide = [DinoV2DataModule(build_source(image_folder), tiny_config(), seed=0).make_stream(0, r, 4) for r in range(4)]
    batch = stream.batch(3)
    assert batch["step"] == 3 and len(batch["micro_batches"]) == 2
    for micro, lane in zip(batch["micro_batches"], (1, 3), strict=True):  # rank 1 of 2: lanes 1 and 3 of 4
        want = wide[lane].batch(3)
        assert micro["positions"].tolist() == wide[lane].positions(3) == list(range((12 + lane) * 4, (13 + lane) * 4))
        for key in ("collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list"):
            assert torch.equal(micro[key], want[key]), key
    assert not torch.equal(batch["micro_batches"][0]["collated_masks"], batch["micro_batches"][1]["collated_masks"])


def _fit(cfg, batches: list[dict]) -> DinoV2Module:
    torch.manual_seed(0)
    module = DinoV2Module(cfg, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    return module


def test_two_equal_micro_batches_make_exactly_the_step_of_one(image_folder):
    """Accumulating a micro-batch twice (loss / 2 each) must give bit for bit the update of one batch with the same
    global batch (lr): no gradient lost, none counted twice, one AdamW step and one EMA update per step. Sinkhorn-
    Knopp (no centering state) and no drop path, so the two forwards are identical."""
    changes = {"centering": "sinkhorn_knopp", "student.drop_path_rate": 0.0}
    data = DinoV2DataModule(build_source(image_folder), tiny_config(**changes), seed=0).make_stream()
    plain = [data.batch(s) for s in range(3)]  # lr is 0 at step 0 (warmup): the later steps move the weights
    twice = [{"micro_batches": [b, b], "step": b["step"]} for b in plain]
    one = _fit(tiny_config(**changes, batch_size_per_gpu=8), plain)
    two = _fit(tiny_config(**changes, accumulate_grad_batches=2), twice)
    a, b = one.meta.state_dict(), two.meta.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["student.backbone.blocks.0.attn.qkv.weight"],
                           DinoV2Module(tiny_config(**changes), seed=0).meta.state_dict()["student.backbone.blocks.0.attn.qkv.weight"])
    for key in ("total_loss", "proto_entropy", "grad_norm_backbone"):
        assert two.last_record[key] == one.last_record[key], key


@pytest.mark.slow
def test_a_run_with_accumulation_resumes_exactly(image_folder, tmp_path):
    cfg = tiny_config(accumulate_grad_batches=2)
    whole = pretrain(image_folder, tmp_path / "whole", cfg, seed=3)
    assert pretrain(image_folder, tmp_path / "resumed", cfg, seed=3, interrupt_at=5).steps == 5
    resumed = pretrain(image_folder, tmp_path / "resumed", cfg, seed=3)
    assert_same_trajectory(resumed.metrics_csv, whole)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        pretrain(image_folder, tmp_path / "resumed", tiny_config(accumulate_grad_batches=1), seed=3)
