"""Per-shard task runs: retries after a failure and a wall-clock limit per attempt (`run.shard_*`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flows.fanout import prefect_mapper
from infra.config.run import RunConfig


def _attempt(counter: Path) -> int:
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    return n


def flaky(counter: Path, fails: int) -> int:
    """Fails its first `fails` attempts (a transient error), then returns the attempt number."""
    n = _attempt(counter)
    if n < fails:
        raise OSError(f"transient failure {n}")
    return n


def hangs_first(counter: Path, seconds: float) -> int:
    """The first attempt spins for `seconds` (a hung shard), later ones return at once."""
    n = _attempt(counter)
    start = time.monotonic()
    while n == 0 and time.monotonic() - start < seconds:
        time.sleep(0.01)
    return n


def test_shard_retries(tmp_path, prefect_server):
    run = RunConfig(shard_retries=2, shard_retry_delay_s=0)
    assert list(prefect_mapper(run, "t")(flaky, [(tmp_path / "a", 2)])) == [2]  # third attempt succeeds
    with pytest.raises(OSError, match="transient failure 1"):  # attempts spent: the stage sees the shard's error
        list(prefect_mapper(RunConfig(shard_retries=1, shard_retry_delay_s=0), "t")(flaky, [(tmp_path / "b", 2)]))
    assert (tmp_path / "b").read_text() == "2"
    with pytest.raises(OSError, match="transient failure 0"):  # default: no retry
        list(prefect_mapper(RunConfig(), "t")(flaky, [(tmp_path / "c", 1)]))


def test_shard_timeout_fails_then_retries_a_hung_shard(tmp_path, prefect_server):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out"):
        list(prefect_mapper(RunConfig(shard_timeout_s=0.5), "t")(hangs_first, [(tmp_path / "a", 60.0)]))
    assert time.monotonic() - start < 30  # not the 60 s the attempt would have spun
    run = RunConfig(shard_timeout_s=0.5, shard_retries=1, shard_retry_delay_s=0)
    assert list(prefect_mapper(run, "t")(hangs_first, [(tmp_path / "b", 60.0)])) == [1]


def test_embedding_shards_fan_out_over_dask_workers(tmp_path, prefect_server):
    """`run.task_runner=dask`: pool shards are embedded in 2 worker processes (each builds the model once) and give
    the embeddings, order, ledger and counts of the in-process run; a rerun redoes nothing."""
    from functools import partial

    import numpy as np
    import pandas as pd

    from curation.embed import embed, pool_store
    from flows.models import embedder
    from infra.config.curation import BackboneConfig
    from infra.lineage import Ledger
    from infra.stage import ShardTracker
    from tests.curation.conftest import blob_image, png, write_pool

    shards = write_pool(tmp_path / "pool", [png(blob_image(i)) for i in range(20)], shard_size=6)  # 4 shards
    keep = {i for s in shards for i in s.read_table()["image_id"]} - {shards[2].read_table()["image_id"][1]}
    make = partial(embedder, BackboneConfig(kind="vit", arch="vit_pico", patch_size=4, image_size=28), "vit", 4,
                   "fp32", seed=0)  # fmt: skip
    out = {}
    for name, mapper in (("flow", None), ("dask", prefect_mapper(RunConfig(task_runner="dask", workers=2), "embed"))):
        d = tmp_path / name / "stages" / "embed"
        res = embed(shards, keep, [], d, make, ShardTracker("embed", d), "cpu", 1, mapper=mapper, embedder_key="k")
        meta, store = pool_store(d)
        out[name] = res, meta, store.read_all(), Ledger(tmp_path / name).events()
    (res_f, meta_f, emb_f, _), (res_d, meta_d, emb_d, ev_d) = out["flow"], out["dask"]
    assert res_d.counts == res_f.counts == {"kept": 19, "dropped": {"decode_error": 0}, "seeds": {}}
    pd.testing.assert_frame_equal(meta_d, meta_f)
    np.testing.assert_allclose(emb_d, emb_f, atol=1e-3)  # fp16 storage; worker thread counts may differ
    assert res_d.extra["shards_on"] == "task runner" and res_d.extra["embedder"] == "resumed"  # no model here
    done = tmp_path / "dask" / "stages" / "embed" / "_done"
    stamps = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    assert len(stamps) == 4, stamps
    again = embed(shards, keep, [], tmp_path / "dask" / "stages" / "embed", make,
                  ShardTracker("embed", tmp_path / "dask" / "stages" / "embed"), "cpu", 1,
                  mapper=prefect_mapper(RunConfig(task_runner="dask", workers=2), "embed"), embedder_key="k")  # fmt: skip
    assert again.counts == res_d.counts and {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == stamps
    assert set(ev_d["stage"]) <= {"embed"}


@pytest.mark.parametrize("cluster", ["dask", "ray"])
def test_dedup_descriptors_fan_out_over_cluster_workers(tmp_path, prefect_server, cluster, monkeypatch):
    """The copy-detection descriptors of each pool shard are computed in the workers of a local Dask or Ray cluster
    (the model built from the config there): the same descriptor files, components and ledger as the in-process
    stage."""
    import builtins

    import pandas as pd

    monkeypatch.setattr(builtins, "print", builtins.print)  # ray.shutdown() leaves Ray's print in builtins: undo

    from curation.dedup import COMPONENTS, DESCRIPTORS, dedup
    from infra.config.curation import DedupConfig
    from infra.stage import ShardTracker
    from tests.curation.test_dedup import PIXEL, _planted

    shards, ev = _planted(tmp_path)  # 21 rows in 3 shards: planted pool copies and evaluation-set copies
    cfg = DedupConfig.model_validate(PIXEL)
    out = {}
    cluster_mapper = prefect_mapper(RunConfig(task_runner=cluster, workers=2), "dedup", gpu=True)
    for name, mapper in (("flow", None), (cluster, cluster_mapper)):
        d = tmp_path / name
        res = dedup(shards, ev, d, cfg, ShardTracker("dedup", d), mapper=mapper, descriptor_key="pixel")
        files = {p.name: p.read_bytes() for p in sorted((d / DESCRIPTORS).glob("*.npy"))}
        out[name] = res.counts, files, pd.read_parquet(d / COMPONENTS), pd.read_parquet(d / "ledger")
    (counts_f, files_f, comp_f, ledger_f), (counts_d, files_d, comp_d, ledger_d) = out["flow"], out[cluster]
    assert counts_d == counts_f and counts_f["dropped"] == {"near_duplicate": 6, "eval_contamination": 3}
    assert sorted(files_d) == ["00000.npy", "00001.npy", "00002.npy"] and files_d == files_f  # byte-equal
    pd.testing.assert_frame_equal(comp_d, comp_f)
    pd.testing.assert_frame_equal(ledger_d, ledger_f)
    with pytest.raises(ValueError, match="descriptor_key"):
        dedup(shards, ev, tmp_path / "x", cfg, ShardTracker("dedup", tmp_path / "x"), mapper=lambda *a: iter(()))


def test_task_runner_settings_reach_the_runners():
    from prefect_dask import DaskTaskRunner
    from prefect_ray import RayTaskRunner

    from flows.fanout import ray_gpus, task_runner

    local = task_runner(RunConfig(task_runner="ray", workers=3), 3)
    assert isinstance(local, RayTaskRunner) and local.address is None
    assert local.init_kwargs["num_cpus"] == 3 and local.init_kwargs["include_dashboard"] is False
    remote = task_runner(RunConfig(task_runner="ray", ray_address="ray://head:10001"), 2)
    assert remote.address == "ray://head:10001"
    dask = task_runner(RunConfig(task_runner="dask", dask_address="tcp://sched:8786"), 2)
    assert isinstance(dask, DaskTaskRunner) and dask.address == "tcp://sched:8786"
    # A local cluster has the stage's width of workers (`ingest.processes`, NSFW's memory cap), not `run.workers`.
    assert task_runner(RunConfig(task_runner="dask", workers=3), 2).cluster_kwargs["n_workers"] == 2
    assert task_runner(RunConfig(task_runner="ray", workers=3), 2).init_kwargs["num_cpus"] == 2
    assert ray_gpus(RunConfig(ray_gpus_per_task=0.5)) == 0.5
    assert ray_gpus(RunConfig()) == (1.0 if __import__("torch").cuda.is_available() else 0.0)
