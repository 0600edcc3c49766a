"""Two CPU processes (gloo) train the tiny model: DDP keeps ranks identical and logs the mean of the ranks' losses."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_config
from torch.testing import assert_close

from training.data import build_source
from training.metrics import read_csv
from training.module import STEP_SEED_SALT, DinoV2DataModule, DinoV2Module
from training.seeding import reseed

HERE = Path(__file__).parent
REPO = HERE.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(worker: str, *args: str, log_dir: Path, nproc: int = 2) -> None:
    """`worker args` on `nproc` processes; torchrun's own folders go under `log_dir` (by default it leaves one in the
    system's temporary folder per launch)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", f"--log-dir={log_dir}", str(HERE / worker), *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _single_process_losses(cfg, image_folder: Path, rank: int, world: int) -> torch.Tensor:
    """Step 0 of rank `rank` (its first micro-batch), computed in this process: same init, same batch, same RNG."""
    module = DinoV2Module(cfg, seed=0)
    batch = DinoV2DataModule(build_source(image_folder), cfg, seed=0).make_stream(0, rank, world).batch(0)
    reseed(0, 0, rank, STEP_SEED_SALT)
    first = batch.get("micro_batches", [batch])[0]
    terms, _ = module.meta.train().forward_losses(first, teacher_temp=cfg.teacher.warmup_teacher_temp)
    return torch.stack([t.detach() for t in terms.values()]), list(terms)


@pytest.mark.slow
def test_two_process_cpu_ddp_training_with_accumulation(image_folder, tmp_path):
    """2 ranks, 2 micro-batches per step: DDP's all-reduce is blocked in the first backward of each step, and the
    second must still average the gradients summed over both: the ranks stay identical (students, teachers, centers).
    Without accumulation, test_pretrain_on_host_starts_its_own_processes checks the logged loss is the ranks' mean."""
    changes = {"strategy": "ddp", "devices": 2, "max_steps": 3, "cpu_threads": 1, "accumulate_grad_batches": 2}
    _torchrun("ddp_worker.py", str(image_folder), str(tmp_path), json.dumps(changes), log_dir=tmp_path / "elastic")
    r0, r1 = torch.load(tmp_path / "rank0.pt", weights_only=True), torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(r0) == set(r1)
    for key in r0:  # gradients were averaged: both ranks hold identical students, teachers and centers
        assert torch.equal(r0[key], r1[key]), key
    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert json.loads((tmp_path / "derived.json").read_text())["global_batch"] == 4 * 2 * 2
    cfg = tiny_config(**changes)
    per_rank = [_single_process_losses(cfg, image_folder, r, 2)[0] for r in (0, 1)]
    assert not torch.equal(per_rank[0], per_rank[1])  # the ranks did see different data
    start = DinoV2Module(cfg, seed=0).meta.student.backbone.state_dict()
    assert not torch.equal(start["blocks.0.attn.qkv.weight"], r0["student.backbone.blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_pretrain_on_host_starts_its_own_processes(image_folder, tmp_path):
    """What a pipeline stage calls: with 2 devices it starts 2 `training.pretrain` processes under torchrun (not a
    re-run of the caller's command, which for `lvd run` would be the whole flow) and trains as one 2-rank DDP run."""
    from training.launch import pretrain_on_host

    changes = {"devices": 2, "max_steps": 3, "cpu_threads": 1}
    cfg = tiny_config(**changes)
    res = pretrain_on_host(image_folder, tmp_path / "two", cfg, seed=0)
    assert res.steps == 3 and res.teacher_backbone.is_file() and res.checkpoint.exists()
    assert json.loads((tmp_path / "two" / "derived.json").read_text())["world_size"] == 2
    rows = read_csv(res.metrics_csv)
    assert [r["step"] for r in rows] == [0, 1, 2]
    per_rank = [_single_process_losses(cfg, image_folder, r, 2) for r in (0, 1)]
    logged = torch.tensor([rows[0][k] for k in per_rank[0][1]])
    assert_close(logged, (per_rank[0][0] + per_rank[1][0]).float() / 2, rtol=1e-5, atol=1e-6)
    assert res.final["step"] == 2
    # The children's console (infra.console, plain lines into launch.log): rank 0's progress, once; no advertisement.
    lines = (tmp_path / "two" / "launch.log").read_text().splitlines()
    assert sum(bool(re.fullmatch(r"\d\d:\d\d:\d\d INFO    pretrain: step 3/3 \(24 images\) in .*", line))
               for line in lines) == 1, lines
    assert not any("litlogger" in line or "deprecated" in line for line in lines), lines
    gpu = [line for line in lines if line.endswith("GPU available: False, used: False")]
    assert len(gpu) == 1 and re.match(r"\d\d:\d\d:\d\d INFO    lightning", gpu[0]), lines  # one handler, rank 0

    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match=r"(?s)2-process pretraining .* failed \(exit code 1\).*no images found"):
        pretrain_on_host(tmp_path / "empty", tmp_path / "bad", cfg, seed=0)
    with pytest.raises(ValueError, match=r"train\.num_nodes=2: a pipeline stage trains on the devices of one host"):
        pretrain_on_host(image_folder, tmp_path / "nodes", tiny_config(num_nodes=2), seed=0)


@pytest.mark.slow
def test_two_rank_sinkhorn_and_centering_equal_one_process_on_the_whole_batch(tmp_path):
    """The all-reduces inside the losses: 2 ranks (gloo) give what one process gives on the concatenated batch."""
    from sinkhorn_worker import inputs, normalise, rank_inputs

    _torchrun("sinkhorn_worker.py", str(tmp_path), log_dir=tmp_path / "elastic")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    x = inputs()
    whole = normalise(x)
    for key in ("dino_sk", "ibot_sk"):  # iBOT: 5 and 9 masked patches, B = 14 from the all-reduced count
        got = torch.cat([r[key] for r in ranks])
        assert_close(got, whole[key], rtol=1e-12, atol=1e-15, msg=key)
        alone = torch.cat([normalise(rank_inputs(x, r))[key] for r in (0, 1)])  # each rank on its own data
        assert (got - alone).abs().max() > 1e-3, key  # the marginals are global, so the all-reduces matter
    assert_close(sum(r["ibot_sk"].sum(0) for r in ranks), whole["ibot_sk"].sum(0), rtol=1e-12, atol=1e-12)
    # DINO centering (equal rows per rank): the center and every step's targets are the single-process ones.
    for step in range(3):
        assert_close(torch.cat([r["dino_centered"][step] for r in ranks]), whole["dino_centered"][step],
                     rtol=1e-5, atol=1e-7)
    assert_close(ranks[0]["dino_center"], whole["dino_center"], rtol=1e-5, atol=1e-7)
    assert torch.equal(ranks[0]["dino_center"], ranks[1]["dino_center"])
    # iBOT centering with unequal masked counts: as the reference, the mean over ranks of each rank's token mean
    # (not the mean over all tokens), identical on every rank.
    center = torch.zeros(1, 7)
    for logits in x["center_ibot"]:
        per_rank = [t.mean(0, keepdim=True) for t in logits.split(x["center_ibot_split"])]
        center = 0.9 * center + 0.1 * (per_rank[0] + per_rank[1]) / 2
    assert_close(ranks[0]["ibot_center"], center, rtol=1e-5, atol=1e-7)
    assert torch.equal(ranks[0]["ibot_center"], ranks[1]["ibot_center"])
    assert (ranks[0]["ibot_center"] - whole["ibot_center"]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def fsdp_run(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    _torchrun("fsdp_worker.py", str(image_folder), str(out), log_dir=out / "elastic")
    return out


@pytest.mark.slow
def test_fsdp_wrapping_equals_gradient_averaging_on_cpu(fsdp_run):
    """The FSDP path (sharded params, per-shard EMA, sharded clipping) trains exactly like plain data parallelism, with
    SHARD_GRAD_OP and with HYBRID_SHARD on 1 node x 2 processes and 2 nodes x 1 (left to FSDP's own node detection,
    which takes a node's size from the visible device count, the replicas were never reduced: a 10-step Lightning run
    on 1 node x 2 ended 1.5 % off)."""
    states = torch.load(fsdp_run / "states.pt", weights_only=True)
    plain = states["plain"]
    assert any(k.startswith("teacher.ibot_head.") for k in plain)
    for run in ("fsdp", "hybrid_2", "hybrid_1"):
        assert set(states[run]) == set(plain), run
        for key in plain:
            assert_close(states[run][key], plain[key], rtol=1e-5, atol=1e-6, msg=f"{run}: {key}")
    assert not torch.equal(plain["teacher.backbone.cls_token"], plain["student.backbone.cls_token"])


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_reduces_head_gradients_in_fp32(fsdp_run):
    """bf16 as resolved for the trainer: bf16 parameters inside the forward, fp32 reduction for the student heads
    only (the paper's "head gradients reduced in fp32"), fp32 buffers, and fp32 sharded parameters and gradients."""
    got = json.loads((fsdp_run / "bf16.json").read_text())
    bf16, fp32 = "torch.bfloat16", "torch.float32"
    low, heads = [[bf16, bf16, fp32]], [[bf16, fp32, fp32]]  # (param, reduce, buffer) dtypes of every unit
    assert got["precision"] == "bf16"
    assert got["units"] == {"student.backbone": low, "student.dino_head": heads, "student.ibot_head": heads,
                            "teacher.backbone": low, "teacher.dino_head": low, "teacher.ibot_head": low}
    assert got["forward_weight"] == {"student": bf16, "teacher": bf16}
    assert got["grads"] == {"backbone": [fp32], "dino_head": [fp32], "ibot_head": [fp32]}
    assert got["params"] == [fp32]
    assert set(got["losses"]) == {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
    assert all(math.isfinite(v) for v in got["losses"].values()) and got["losses"]["ibot_loss"] > 0


@pytest.fixture(scope="module")
def lightning_runs(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lightning")
    _torchrun("fsdp_resume_worker.py", str(image_folder), str(out), "two", log_dir=out / "elastic")
    _torchrun("fsdp_resume_worker.py", str(image_folder), str(out), "one", log_dir=out / "elastic", nproc=1)
    return out


@pytest.mark.slow
def test_lightning_fsdp_resumes_exactly_and_on_fewer_processes_with_the_same_global_batch(lightning_runs):
    """The GPU strategy (Lightning's FSDPStrategy, sharded checkpoints) on CPU processes. A 2-process run preempted at
    step 5 resumes on its 2 processes on the exact trajectory. The same checkpoint, resharded on load, continues on
    1 process x 2 micro-batches: every later step sees the same images (micro-batch j is rank j's batch of the
    uninterrupted run) with the same schedules, the losses move only as far as the per-micro-batch Sinkhorn-Knopp /
    centering / KoLeo groups make them, and they are those of the same run's one-file DDP checkpoint resumed there
    (weights and AdamW state survive the resharding: skipping the optimizer state moved them by 3-10 %)."""
    tmp_path = lightning_runs

    def files(run: str) -> list[str]:
        return sorted(p.name for p in (tmp_path / run / "checkpoints" / "last.ckpt").iterdir())

    assert files("run") == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # one shard per rank
    assert files("reshard") == [".metadata", "__0_0.distcp", "meta.pt"]  # written again by the one process
    rows = {run: read_csv(tmp_path / run / "metrics.csv") for run in ("whole", "run", "reshard", "ddp")}
    assert all([r["step"] for r in got] == list(range(10)) for got in rows.values())
    for a, b in zip(rows["whole"], rows["run"], strict=True):  # exact resume: every value but the step time
        assert {k: v for k, v in b.items() if k != "step_time_s"} == {k: v for k, v in a.items() if k != "step_time_s"}
    whole, run = (load_file(tmp_path / r / "teacher_checkpoint.safetensors") for r in ("whole", "run"))
    assert set(whole) == set(run) and all(torch.equal(whole[k], run[k]) for k in whole)

    lanes = [json.loads((tmp_path / "whole" / f"positions_rank{r}.json").read_text()) for r in (0, 1)]
    seen = json.loads((tmp_path / "reshard" / "positions_rank0.json").read_text())
    assert sorted(seen, key=int) == [str(s) for s in range(5, 10)]
    for step in range(5, 10):
        assert seen[str(step)] == [lanes[r][str(step)][0] for r in (0, 1)]
    a, b = rows["whole"], rows["reshard"]
    for key in ("lr", "last_layer_lr", "wd", "momentum", "teacher_temp"):
        assert [r[key] for r in b] == [r[key] for r in a], key
    assert [r["total_loss"] for r in b[:5]] == [r["total_loss"] for r in a[:5]]
    # Step 5: the same weights and crops; only the groups of the per-micro-batch statistics differ (Sinkhorn-Knopp over
    # 4 + 4 images, not 8 on 2 ranks), which moved this loss by 3 %.
    assert b[5]["total_loss"] != a[5]["total_loss"]
    assert b[5]["total_loss"] == pytest.approx(a[5]["total_loss"], rel=0.06)
    for x, y in zip(rows["ddp"][5:], b[5:], strict=True):  # FSDP and DDP differ in float summation order only
        for key in ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"):
            assert y[key] == pytest.approx(x[key], rel=2e-3), (x["step"], key)  # measured: at most 2.2e-4
    derived = json.loads((tmp_path / "reshard" / "derived.json").read_text())
    assert derived["segments"] == [{"from_step": 0, "world_size": 2, "accumulate_grad_batches": 1},
                                   {"from_step": 5, "world_size": 1, "accumulate_grad_batches": 2}]
    assert derived["global_batch"] == 8 and derived["world_size"] == 1


@pytest.mark.slow
def test_ddp_distillation_gives_every_rank_the_teacher_of_the_bundle(lightning_runs):
    """A distillation teacher loaded on each rank has one module order (`training.checkpoint.BUNDLE_ORDER`), so DDP's
    start-up broadcast from rank 0 lands on the same tensors: before, the order came from the file's metadata in a
    per-process order, and rank 1 trained against a teacher whose tensors were swapped between modules."""
    bundle = load_file(lightning_runs / "whole" / "teacher_checkpoint.safetensors")
    ranks = [torch.load(lightning_runs / "distill" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    teacher = {k: v for k, v in ranks[0].items() if k.startswith("teacher.")}
    assert {k.removeprefix("teacher.") for k in teacher} == set(bundle)
    for key, value in teacher.items():
        assert torch.equal(value, bundle[key.removeprefix("teacher.")]), key  # frozen: the bundle's own tensors
    assert set(ranks[0]) == set(ranks[1])
    for key in ranks[0]:  # and every rank holds the same student, EMA student and teacher
        assert torch.equal(ranks[0][key], ranks[1][key]), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lightning_fsdp_on_gpu_trains_and_resumes(image_folder, tmp_path):
    """Lightning FSDPStrategy (sharded checkpoints, bf16 mixed precision) on the GPUs of this host."""
    from tiny import tiny_config as cfg_of

    from training.pretrain import pretrain

    changes = {"accelerator": "gpu", "strategy": "fsdp", "devices": 1, "precision": "bf16"}
    part = pretrain(image_folder, tmp_path, cfg_of(**changes), seed=0, interrupt_at=5)
    assert part.steps == 5 and (tmp_path / "checkpoints" / "last.ckpt").is_dir()
    done = pretrain(image_folder, tmp_path, cfg_of(**changes), seed=0)
    assert done.steps == 10 and done.teacher_backbone.is_file()
