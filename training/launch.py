"""Pretraining from inside a pipeline run, on every device of this host.

One process trains in the calling process (`training.pretrain.pretrain`). Several are started by
`torch.distributed.run` as `python -m training.pretrain` processes, never by Lightning's own launcher: that one
re-executes the caller's command line in each child, which for `lvd run` would be the whole flow, once per device,
all writing the same run directory. The children read the stage's train config from `launch_config.yaml` in the
output directory, rank 0 writes `launch_result.json`, and their output goes to `launch.log` (its tail is in the error
when they fail); torchrun's own folders go to `torchelastic/` there. Resume is unchanged: the children find the
stage's checkpoint like a single process does.

A pipeline stage trains on one host. For several nodes, start `python -m training.pretrain` on each under the
cluster's launcher (torchrun, srun) on the run's corpus shards, and evaluate its export with `lvd evaluate`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from infra.config.train import TrainConfig
from infra.cpus import cpus
from infra.storage import atomic_write_text, read_json
from training.pretrain import PretrainResult, host_processes, pretrain
from training.strategy import resolve_accelerator

LOG_TAIL = 4000


def pretrain_on_host(data: Path, out_dir: Path, cfg: TrainConfig, *, seed: int = 0) -> PretrainResult:
    """`pretrain(data, out_dir, cfg)` with `host_processes(cfg)` processes on this host (`data`: a folder of shards
    or images, as `python -m training.pretrain --data`)."""
    if cfg.num_nodes > 1:
        raise ValueError(f"train.num_nodes={cfg.num_nodes}: a pipeline stage trains on the devices of one host; for "
                         "several nodes run `python -m training.pretrain` under your cluster launcher (see "
                         "training/launch.py)")
    n = host_processes(cfg)
    if n == 1:
        return pretrain(data, out_dir, cfg, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config, result, log = out_dir / "launch_config.yaml", out_dir / "launch_result.json", out_dir / "launch.log"
    atomic_write_text(config, yaml.safe_dump({"train": cfg.model_dump(mode="json")}, sort_keys=False))
    result.unlink(missing_ok=True)
    # --log-dir: torchrun's per-launch folders (workers' error files) stay with the run, not one more folder left in
    # the system's temporary folder at every launch.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           f"--log-dir={out_dir / 'torchelastic'}", "-m", "training.pretrain", "--data", str(data), "--out", str(out_dir),
           "--config", str(config), "--seed", str(seed), "--result", str(result)]
    env = dict(os.environ)
    if cfg.cpu_threads:
        env.setdefault("OMP_NUM_THREADS", str(cfg.cpu_threads))
    elif resolve_accelerator(cfg) == "cpu":  # (torchrun's own default is 1 thread per process)
        env.setdefault("OMP_NUM_THREADS", str(max(1, cpus() // n)))  # the host's CPUs shared by the processes
    with open(log, "ab") as sink:
        code = subprocess.run(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0 or not result.is_file():
        tail = log.read_bytes()[-LOG_TAIL:].decode(errors="replace")
        raise RuntimeError(f"{n}-process pretraining in {out_dir} failed (exit code {code}); the last lines of "
                           f"{log}:\n{tail}")
    return PretrainResult.from_json(read_json(result))

