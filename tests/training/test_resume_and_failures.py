"""The training system end to end on a tiny model: exact resume (also after SIGKILL and crashes inside the checkpoint
swap), exports, NaN detection, modes."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tiny import TINY, tiny_config
from torch.testing import assert_close

from training.callbacks import _swap_into_place, find_resume_checkpoint
from training.checkpoint import load_backbone, load_bundle
from training.meta_arch import NonFiniteLossError
from training.metrics import read_csv
from training.pretrain import PretrainResult, pretrain

REPO = Path(__file__).resolve().parents[2]
LOSSES = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
COMPARED = (*LOSSES, "lr", "wd", "momentum", "teacher_temp", "proto_entropy")


@pytest.fixture(scope="module")
def full_run(image_folder, tmp_path_factory) -> PretrainResult:
    """The uninterrupted reference: 10 steps, seed 3; drop path 0.2 (efficient variant), masking, centering, all on."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    return pretrain(image_folder, tmp_path_factory.mktemp("full"), tiny_config(), seed=3)


def assert_same_trajectory(metrics_csv: Path, reference: PretrainResult, from_step: int = 0) -> None:
    """Rows 0..9 once each (no duplicates left by the interrupted attempt), equal to the reference from `from_step`."""
    rows, ref = read_csv(metrics_csv), read_csv(reference.metrics_csv)
    assert [r["step"] for r in rows] == list(range(10))
    for ra, rb in zip(ref[from_step:], rows[from_step:], strict=True):
        for key in COMPARED:
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)


class StartState(L.Callback):
    """What a run starts from: the step restored from the checkpoint, and the checkpoint folder after set-up."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step
        self.files = sorted(p.name for p in (Path(trainer.default_root_dir) / "checkpoints").iterdir())


def test_interrupted_run_resumes_exactly(image_folder, tmp_path, full_run, caplog):
    cfg = tiny_config()
    full = full_run
    part = pretrain(image_folder, tmp_path / "resumed", cfg, seed=3, interrupt_at=5)
    assert part.steps == 5 and part.checkpoint.is_file()
    caplog.set_level(logging.INFO, "lvd")
    caplog.clear()  # the console lines of the resumed run only (the interrupted one logs too where "lvd" is at INFO)
    resumed = pretrain(image_folder, tmp_path / "resumed", cfg, seed=3)
    assert (full.steps, resumed.steps) == (10, 10)
    a, b = read_csv(full.metrics_csv), read_csv(resumed.metrics_csv)
    assert [r["step"] for r in b] == list(range(10))  # no duplicated rows from the interrupted run
    # The console (infra.console): the first step trained here, then (after 30 s, if any) periodic lines, the summary.
    lines = [r.getMessage() for r in caplog.records if r.name == "lvd"]
    batch = json.loads((tmp_path / "resumed" / "derived.json").read_text())["global_batch"]
    loss6, loss10 = (re.escape(f"{float(b[i]['total_loss']):.4g}") for i in (5, 9))
    assert re.fullmatch(rf"pretrain: step 6/10, loss {loss6}, [\d.]+ images/s, ETA \d:\d\d:\d\d", lines[0]), lines
    assert re.fullmatch(rf"pretrain: step 10/10 \({5 * batch} images; 5 done before\) in \d:\d\d:\d\d, [\d.]+ "
                        rf"images/s, loss {loss10}", lines[-1]), lines
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


def test_activation_checkpointing_trains_on_the_same_trajectory_and_can_be_switched_on_at_resume(image_folder, tmp_path,
                                                                                                 full_run):
    """The memory switch a user flips after an out-of-memory: steps 5-9 trained with it (resumed from a checkpoint
    written without it) give the losses, schedules and teacher of the uninterrupted run without it."""
    on = tiny_config(activation_checkpointing=True)
    pretrain(image_folder, tmp_path / "switched", tiny_config(), seed=3, interrupt_at=5)
    resumed = pretrain(image_folder, tmp_path / "switched", on, seed=3)
    assert_same_trajectory(resumed.metrics_csv, full_run)
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(load_backbone(resumed.teacher_backbone)(img), load_backbone(full_run.teacher_backbone)(img),
                     rtol=1e-6, atol=1e-6)


def test_sigkilled_training_process_resumes_on_the_same_trajectory(image_folder, tmp_path, full_run):
    """A real `python -m training.pretrain` is SIGKILLed mid-epoch once a checkpoint exists; the same command again
    resumes from that checkpoint and ends on the uninterrupted trajectory."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"train": {**TINY, "checkpoint_every": 2, "cpu_threads": 2}}))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.pretrain", "--data", str(image_folder), "--out", str(out),
           "--config", str(config), "--seed", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ckpt = out / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it was still running: the kill interrupted it
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert killed_at in (2, 4, 6, 8) and not (out / "teacher_backbone.safetensors").exists()

    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {ckpt}" in resumed.stderr
    assert_same_trajectory(out / "metrics.csv", full_run)  # rows before the kill were written by the killed process
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(load_backbone(out / "teacher_backbone.safetensors")(img),
                     load_backbone(full_run.teacher_backbone)(img), rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]


@pytest.fixture(scope="module")
def stopped_at_4(image_folder, tmp_path_factory) -> Path:
    """A run stopped after 4 steps with its checkpoint: copied by the crash-simulation tests."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert pretrain(image_folder, out, tiny_config(), seed=3, interrupt_at=4).steps == 4
    return out


@pytest.mark.parametrize("last", ["missing", "partial"])
def test_a_crash_inside_the_checkpoint_swap_resumes_from_the_previous_checkpoint(image_folder, tmp_path, full_run,
                                                                                 stopped_at_4, last):
    """The state a crash between the two renames leaves (the previous checkpoint moved to `last.ckpt.old`; `last.ckpt`
    missing, or half-written), plus the partial checkpoints being written then: resume uses `.old`, the leftovers are
    swept before training starts, and the run ends on the reference trajectory."""
    out = tmp_path / "run"
    shutil.copytree(stopped_at_4, out)
    ckpts = out / "checkpoints"
    os.replace(ckpts / "last.ckpt", ckpts / "last.ckpt.old")
    newer = full_run.checkpoint.read_bytes()  # a later checkpoint (step 10), cut short
    if last == "partial":
        (ckpts / "last.ckpt").write_bytes(newer[: len(newer) // 2])
    (ckpts / ".last.ckpt.tmp6").write_bytes(newer[:1000])  # a file checkpoint being written
    (ckpts / ".last.ckpt.tmp8").mkdir()  # a sharded (directory) checkpoint being written
    (ckpts / ".last.ckpt.tmp8" / "__0_0.distcp").write_bytes(b"\0" * 100)
    assert find_resume_checkpoint(ckpts) == ckpts / "last.ckpt.old"

    start = StartState()
    resumed = pretrain(image_folder, out, tiny_config(), seed=3, callbacks=[start])
    assert start.step == 4  # restored from the previous complete checkpoint, not from scratch
    assert start.files == (["last.ckpt", "last.ckpt.old"] if last == "partial" else ["last.ckpt.old"])
    assert resumed.steps == 10
    assert_same_trajectory(resumed.metrics_csv, full_run, from_step=4)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]  # `.old` goes once a newer one is in place
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 10


def _sharded(path: Path, step: int, complete: bool = True) -> Path:
    """A directory checkpoint as Lightning's FSDP strategy writes it (DCP shards + `.metadata`, then `meta.pt`)."""
    path.mkdir()
    (path / "__0_0.distcp").write_text(str(step))
    if complete:
        (path / ".metadata").write_text("dcp")
        (path / "meta.pt").write_text("lightning")
    return path


def _step(path: Path) -> int:
    return int((path / "__0_0.distcp").read_text())


def test_directory_checkpoints_keep_the_previous_one_until_the_new_one_is_in_place(tmp_path):
    """`_swap_into_place` for sharded checkpoints, from every state a crash inside it can leave."""
    final, old = tmp_path / "last.ckpt", tmp_path / "last.ckpt.old"
    _swap_into_place(_sharded(tmp_path / ".last.ckpt.tmp2", 2), final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and _step(final) == 2
    # Crash between the renames: the previous checkpoint is `.old`, `last.ckpt` is missing.
    os.replace(final, old)
    assert find_resume_checkpoint(tmp_path) == old
    _swap_into_place(_sharded(tmp_path / ".last.ckpt.tmp4", 4), final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and _step(final) == 4
    # Crash while removing `.old` after the second rename: both are there, `last.ckpt` is whole and wins.
    _sharded(old, 2, complete=False)
    assert find_resume_checkpoint(tmp_path) == final
    _swap_into_place(_sharded(tmp_path / ".last.ckpt.tmp6", 6), final)  # (renaming onto a non-empty `.old` fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and _step(final) == 6
    # `last.ckpt` incomplete beside a whole `.old`: resume uses `.old`, and the partial one never replaces it.
    os.replace(final, old)
    _sharded(final, 8, complete=False)
    assert find_resume_checkpoint(tmp_path) == old
    _swap_into_place(_sharded(tmp_path / ".last.ckpt.tmp8", 8), final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and _step(final) == 8


def test_an_incomplete_checkpoint_without_a_previous_one_is_an_error(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(RuntimeError, match=r"no complete resume checkpoint in .* \(last\.ckpt incomplete\); move"):
        find_resume_checkpoint(tmp_path)
    (tmp_path / "last.ckpt").unlink()
    assert find_resume_checkpoint(tmp_path) is None


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


def test_periodic_teacher_exports_follow_the_reference_names_and_survive_resume(image_folder, tmp_path):
    cfg = tiny_config(max_steps=4, eval_period_iterations=2)
    whole = pretrain(image_folder, tmp_path / "whole", cfg, seed=0)
    exports = sorted(p.name for p in (tmp_path / "whole" / "eval").iterdir())
    assert exports == ["training_1", "training_3"]  # (iteration + 1) % period == 0, 0-based names as the reference
    states = {e: load_backbone(tmp_path / "whole" / "eval" / e / "teacher_backbone.safetensors").state_dict()
              for e in exports}
    final = load_backbone(whole.teacher_backbone).state_dict()
    assert all(torch.equal(states["training_3"][k], final[k]) for k in final)  # the last period is the end
    assert not torch.equal(states["training_1"]["blocks.0.attn.qkv.weight"], final["blocks.0.attn.qkv.weight"])
    assert (tmp_path / "whole" / "eval" / "training_1" / "teacher_checkpoint.safetensors").is_file()

    pretrain(image_folder, tmp_path / "resumed", cfg, seed=0, interrupt_at=3)  # training_1 before, training_3 after
    pretrain(image_folder, tmp_path / "resumed", cfg, seed=0)
    for e in exports:  # the same weights as the uninterrupted run's
        again = load_backbone(tmp_path / "resumed" / "eval" / e / "teacher_backbone.safetensors").state_dict()
        assert all(torch.equal(again[k], states[e][k]) for k in again), e


def test_resume_refuses_a_changed_global_batch(image_folder, tmp_path):
    pretrain(image_folder, tmp_path / "r", tiny_config(), seed=0, interrupt_at=2)
    with pytest.raises(ValueError, match=r"global batch of 4 \(1 processes .* x 1 micro-batches x 4\) and this start "
                                         r"gives 8 \(2 x 1 x 4\).* Resume with processes x train.accumulate_grad_batches = 1,"):
        pretrain(image_folder, tmp_path / "r", tiny_config(devices=2), seed=0)
    with pytest.raises(ValueError, match=r"gives 8 \(1 x 2 x 4\).* = 1 \(here: train.accumulate_grad_batches=1\)"):
        pretrain(image_folder, tmp_path / "r", tiny_config(accumulate_grad_batches=2), seed=0)
    assert pretrain(image_folder, tmp_path / "r", tiny_config(devices=1), seed=0, interrupt_at=3).steps == 3
    derived = json.loads((tmp_path / "r" / "derived.json").read_text())
    assert derived["segments"] == [{"from_step": 0, "world_size": 1, "accumulate_grad_batches": 1}]


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


def test_status_says_where_an_unfinished_run_continues(image_folder, tmp_path, capsys):
    """`lvd status`: a preempted training stage shows the step its checkpoint resumes at, rebalancing its saved k-means
    steps, a sharded stage its finished shards; completed and untouched stages show nothing of the kind."""
    from curation.rebalance import CHECKPOINTS
    from flows.cli import main
    from infra.runs import prepare_run
    from infra.storage import Markers

    run, _ = prepare_run(REPO / "configs" / "tiny.yaml", [f"run.root={tmp_path}"])
    pretrain(image_folder, run.stage_dir("pretrain"), tiny_config(), seed=0, interrupt_at=3)
    for shard in ("00000", "00001"):
        Markers(run.stage_dir("nsfw")).mark(shard)
    (run.stage_dir("rebalance") / CHECKPOINTS).mkdir(parents=True)
    for name in ("level0_0.npz", "level0_1.npz"):
        (run.stage_dir("rebalance") / CHECKPOINTS / name).write_bytes(b"")
    run.stage_dir("faces").mkdir()
    assert main(["status", run.run_id, "--root", str(tmp_path), "--json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)["stages"]}
    assert rows["pretrain"]["progress"] == "resumes at step 3 of 10 (its checkpoint)"
    assert rows["rebalance"]["progress"] == "2 k-means steps saved"
    assert rows["nsfw"]["progress"] == "2 shards done"
    assert rows["faces"]["state"] == "partial" and rows["faces"]["progress"] is None
    assert "progress" not in rows["ingest"] and rows["ingest"]["state"] == "pending"
    assert main(["status", run.run_id, "--root", str(tmp_path)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("pretrain")]
    assert re.fullmatch(r"pretrain +partial +0  resumes at step 3 of 10 \(its checkpoint\)", line), line
    # Training went on past its checkpoint (still running, or killed before the next one): both steps are shown.
    (run.stage_dir("pretrain") / "progress.json").write_text(json.dumps({"step": 5, "total": 10}))
    assert main(["status", run.run_id, "--root", str(tmp_path), "--json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)["stages"]}
    assert rows["pretrain"]["progress"] == "at step 5 of 10, resumes at step 3 (its checkpoint)"
