"""Run-level settings: where runs live, identity, seed, and how stages fan out."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from infra.config.base import Section, Width

STAGES = (
    "crawl",
    "ingest",
    "nsfw",
    "faces",
    "dedup",
    "embed",
    "retrieve",
    "rebalance",
    "corpus",
    "pretrain",
    "pretrain_highres",
    "distill",
    "evaluate",
)


class RunConfig(Section):
    root: Path = Path("runs")
    # None: derived from the config file name and the config hash, so re-running the same
    # configuration lands in the same run directory and reuses every completed stage.
    run_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    seed: int = 0
    # A stage that another run under `root` completed with the same key (configuration of the stage, code, upstream
    # outputs, external files) is taken from it, not computed again: its output files hard-linked (copied across
    # file systems). A run that changes, say, only the dedup threshold or the training recipe downloads nothing.
    reuse_runs: bool = True
    # Stop after this stage (inclusive); None runs the whole pipeline.
    stop_after: Literal[STAGES] | None = None  # type: ignore[valid-type]
    # Fan-out of per-shard work inside a stage: Prefect's thread pool, or a Dask/Ray cluster.
    task_runner: Literal["thread", "dask", "ray"] = "thread"
    # Shards in flight at once (threads, local Dask worker processes or local Ray CPUs). auto: the CPUs this process
    # may use, its affinity or its container's CPU quota, whichever is smaller (infra.cpus).
    workers: Width = "auto"
    # Address of an existing Dask scheduler (tcp://host:8786); None starts a local cluster.
    dask_address: str | None = None
    # Address of an existing Ray cluster ("auto", "ray://head:10001"); None starts a local Ray with `workers` CPUs.
    ray_address: str | None = None
    # GPUs Ray reserves for each shard task of the model stages (dedup descriptors, embedding; 0.5 packs two per GPU).
    # Ray hides every GPU from a task that reserves none, so 0 runs them on the CPU. None: 1 where the flow's host
    # has CUDA, else 0.
    ray_gpus_per_task: float | None = Field(default=None, ge=0)
    # Per-shard task runs: retries after a failure (a lost worker, a transient disk or network error; a shard's
    # outputs are written atomically, so a retry starts it clean) and a wall-clock limit per attempt (a hung shard
    # fails, and is retried, instead of stalling the stage). The stage fails once a shard's attempts are spent;
    # the shards finished by then are kept and a re-run resumes at the shard.
    shard_retries: int = Field(default=0, ge=0)
    shard_retry_delay_s: float = Field(default=5.0, ge=0)
    shard_timeout_s: float | None = Field(default=None, gt=0)
