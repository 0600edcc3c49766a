"""Commands that read a run start light: `lvd status`, `lineage`, `domains` and `audit` import no torch (it costs
~2 s and ~700 MB before anything is printed), a training stage's resume step included; `status` and `lineage` not
even pandas (~0.5 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

from flows import resume_points
from infra.lineage_index import index_stage
from tests.evaluation.run_fixture import build_run

REPO = Path(__file__).resolve().parents[2]
CHILD = """
import json, sys
from flows.cli import main
out = {}
for argv in json.loads(sys.argv[1]):
    rc = main(argv)
    heavy = ("torch", "lightning", "faiss", "curation", "training", "pandas")
    out[argv[0]] = [rc, sorted(m for m in heavy if m in sys.modules)]
print("RESULT" + json.dumps(out))
"""


def _checkpoint(path: Path, step: int, objects: bool = True) -> None:
    """A checkpoint in Lightning's layout (torch.save of a dict with tensors, optimizer states, callbacks; with
    ``objects``, hyper-parameters that torch's weights-only loader refuses)."""
    import torch

    torch.save({"epoch": 1, "global_step": step, "pytorch-lightning_version": "2.5.0",
                "state_dict": OrderedDict(w=torch.ones(3, 2), b=torch.zeros(2, dtype=torch.bfloat16)),
                "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 2}}}},
                "callbacks": {"AtomicCheckpoint": {"every": 2}},
                "optimizer_states": [{"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(3, 2)}},
                                      "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}],
                "lr_schedulers": [], "hyper_parameters": {"root": Path("/runs"), "seen": {1, 2}} if objects else {},
                "device": torch.device("cpu")}, path)  # fmt: skip


@pytest.fixture
def run(tmp_path) -> Path:
    """The report's fixture run, its pretraining interrupted after a checkpoint at step 7 (progress at step 9)."""
    run = build_run(tmp_path / "runs")
    pretrain = run / "stages" / "pretrain"
    (pretrain / "manifest.json").unlink()
    (pretrain / "checkpoints").mkdir()
    _checkpoint(pretrain / "checkpoints" / "last.ckpt", 7)
    (pretrain / "progress.json").write_text(json.dumps({"step": 9, "total": 30}))
    for stage in (run / "stages").iterdir():
        index_stage(stage)  # as each stage's completion does
    return run


def test_read_commands_import_no_torch(run):
    root = ["--root", str(run.parent)]
    argv = [["status", run.name, *root], ["lineage", run.name, "row:12", *root], ["domains", run.name, *root],
            ["audit", run.name, *root]]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.rsplit("RESULT", 1)[1])
    # in this order, in one process: what status and lineage import is all that is loaded when they finish
    assert {name: heavy for name, (_rc, heavy) in result.items()} == {"status": [], "lineage": [],
                                                                     "domains": ["pandas"], "audit": ["pandas"]}
    assert [result[n][0] for n in ("status", "lineage", "domains")] == [0, 0, 0]
    assert "pretrain   partial" in proc.stdout and "at step 9, resumes at step 7 (its checkpoint)" in proc.stdout


def test_checkpoint_step_without_torch_agrees_with_torch(tmp_path):
    from training.callbacks import checkpoint_step, find_resume_checkpoint

    _checkpoint(tmp_path / "last.ckpt", 123, objects=False)
    assert resume_points.checkpoint_step(tmp_path / "last.ckpt") == checkpoint_step(tmp_path / "last.ckpt") == 123
    sharded = tmp_path / "sharded" / "last.ckpt"  # a sharded (FSDP) checkpoint: the step is in Lightning's meta.pt
    sharded.mkdir(parents=True)
    _checkpoint(sharded / "meta.pt", 45, objects=False)
    (sharded / ".metadata").write_bytes(b"dcp")
    assert resume_points.checkpoint_step(sharded) == checkpoint_step(sharded) == 45
    for ckpt_dir in (tmp_path, sharded.parent, tmp_path / "none"):
        ckpt_dir.mkdir(exist_ok=True)
        assert resume_points.resume_checkpoint(ckpt_dir) == find_resume_checkpoint(ckpt_dir)
    (tmp_path / "broken" ).mkdir()
    (tmp_path / "broken" / "last.ckpt").write_bytes(b"not a zip")  # left to training's own rules: it refuses
    with pytest.raises(RuntimeError, match="no complete resume checkpoint"):
        resume_points.resume_checkpoint(tmp_path / "broken")


def test_names_mirror_the_modules_that_write_the_files():
    from curation.rebalance import CHECKPOINTS
    from flows import stages
    from training.callbacks import PROGRESS

    assert (resume_points.KMEANS_STEPS, resume_points.PROGRESS) == (CHECKPOINTS, PROGRESS)
    assert stages.TRAINING_STAGES is resume_points.TRAINING_STAGES and stages.resume_step is resume_points.resume_step


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """`lvd ... | head`: a pipe whose reader is gone ends the command quietly with the shell's status for it."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes its first line
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "folder-urls", str(tmp_path / "photos"),
                           str(tmp_path / "l.parquet")], stdout=write, stderr=subprocess.PIPE, cwd=REPO, timeout=60)  # fmt: skip
    os.close(write)
    assert (proc.returncode, proc.stderr.decode()) == (141, "")
