"""`lvd resume RUN_ID key=value`: only how a run executes may change, and no finished stage is invalidated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from flows.stages import SPECS
from infra.config import ConfigError, config_hash, load_config
from infra.run import RunDir
from infra.runs import RESUME_OVERRIDABLE, amend_run, prepare_run

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
AMEND = ["run.shard_retries=3", "run.shard_timeout_s=600", "run.workers=4", "run.task_runner=dask",
         "run.dask_address=tcp://127.0.0.1:8786", "run.shard_retry_delay_s=1", "run.ray_address=ray://head:10001",
         "run.ray_gpus_per_task=0.5", "train.devices=4", "train.num_nodes=2", "train.accumulate_grad_batches=2",
         "train.num_workers=3", "train.cpu_threads=1", "train.log_every=5", "train.checkpoint_every=7",
         "train.activation_checkpointing=true", "train.exports=[hf,timm]", "ingest.threads=4", "ingest.processes=2",
         "ingest.chunk_rows=5000", "ingest.url_dedup_buckets=16", "nsfw.threads=2", "faces.threads=2",
         "dedup.descriptor.threads=2", "embed.decode_threads=4"]


def test_execution_overrides_change_no_stage_key():
    assert sorted(o.partition("=")[0] for o in AMEND) == sorted(RESUME_OVERRIDABLE)
    base, amended = load_config(DEMO), load_config(DEMO, AMEND)
    assert config_hash(base) != config_hash(amended)
    for spec in SPECS.values():
        assert config_hash(base, spec.sections) == config_hash(amended, spec.sections), spec.name
        if spec.shard_sections:
            assert config_hash(base, spec.shard_sections) == config_hash(amended, spec.shard_sections), spec.name
    # (before, the curation stages' threads and processes were in their keys: `ingest.processes=2` on a re-run of a
    # folder downloaded it all again, `nsfw.threads=2` scored it all again)
    other = load_config(DEMO, ["ingest.image_size=97"])  # what a stage computes still changes its key
    assert config_hash(base, SPECS["ingest"].sections) != config_hash(other, SPECS["ingest"].sections)


def test_resume_amends_only_execution_keys(tmp_path, capsys):
    run, cfg = prepare_run(DEMO, [f"run.root={tmp_path}"])
    assert (cfg.run.shard_retries, cfg.run.workers) == (0, "auto")
    changed = amend_run(run, ["run.shard_retries=3", "run.workers=4", "run.task_runner=thread"])
    assert changed == {"run.shard_retries": (0, 3), "run.workers": ("auto", 4)}  # task_runner was already thread
    saved = run.load_config()
    assert (saved.run.shard_retries, saved.run.workers) == (3, 4)
    assert saved.model_dump(exclude={"run"}) == cfg.model_dump(exclude={"run"})
    event = json.loads(run.events_path.read_text().splitlines()[-1])
    assert event["event"] == "config_amended"
    assert event["changed"] == {"run.shard_retries": {"old": 0, "new": 3}, "run.workers": {"old": "auto", "new": 4}}
    again, cfg2 = prepare_run(DEMO, [f"run.root={tmp_path}"])  # `lvd run` of the same config: the amended run
    assert again.path == run.path and cfg2.run.shard_retries == 3
    assert amend_run(run, []) == {}

    with pytest.raises(ConfigError, match=r"train.max_steps: a resumed run keeps its configuration"):
        amend_run(run, ["run.workers=8", "train.max_steps=5"])
    assert run.load_config().run.workers == 4  # nothing applied
    with pytest.raises(ConfigError, match=r"run\.workers"):  # invalid value: validated like `lvd run`
        amend_run(run, ["run.workers=0"])
    assert main(["resume", run.run_id, "run.seed=1", "--root", str(tmp_path)]) == 2
    assert "run.seed: a resumed run keeps its configuration" in capsys.readouterr().err


def test_resume_may_trade_devices_for_micro_batches_at_the_same_global_batch(tmp_path):
    """Lost half the GPUs: resume on the rest with twice the micro-batches (the training stage continues from its
    checkpoint: tests/training/test_distributed.py); a change of devices x nodes x micro-batches is refused."""
    run, _ = prepare_run(DEMO, [f"run.root={tmp_path}", "train.devices=8"])
    assert amend_run(run, ["train.devices=4", "train.accumulate_grad_batches=2"]) == {
        "train.devices": (8, 4), "train.accumulate_grad_batches": (1, 2)}
    with pytest.raises(ConfigError, match=r"16 batches per step where the run has 8 \(4 x 1 x 2\).* Keep the product"):
        amend_run(run, ["train.devices=8"])
    saved = run.load_config().train
    assert (saved.devices, saved.accumulate_grad_batches) == (4, 2)
    assert amend_run(run, ["train.devices=auto"]) == {"train.devices": (4, "auto")}  # the host decides: checked there


def test_relative_paths_are_saved_as_the_files_they_name_when_the_run_starts(tmp_path, monkeypatch):
    """A run's configuration names its files in full, so `lvd resume` from another directory and the workers of a
    cluster (their working directory is their own) read the same files; the same configuration typed in another
    directory, where its relative paths name other files, is refused instead of reading the run's."""
    here, there = tmp_path / "here", tmp_path / "there"
    for d in (here, there):
        (d / "photos").mkdir(parents=True)
        (d / "photos.parquet").write_bytes(b"")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    overrides = ["data.url_list=photos.parquet", "ingest.local_roots=[photos, ~/more]", "demo.enabled=false",
                 "embed.allow_random_init=true", f"run.root={tmp_path / 'runs'}", "evaluate.cache_dir=../cache"]
    monkeypatch.chdir(here)
    run, cfg = prepare_run(None, overrides)
    saved = run.load_config()
    assert saved == cfg and run.root == tmp_path / "runs"
    assert saved.data.url_list == here / "photos.parquet"
    assert saved.ingest.local_roots == [here / "photos", tmp_path / "home" / "more"]
    assert saved.evaluate.cache_dir == tmp_path / "cache"
    monkeypatch.chdir(there)
    with pytest.raises(ConfigError) as err:
        prepare_run(None, overrides)
    assert err.value.problems == [
        f"data.url_list: {there / 'photos.parquet'} here, but run {run.run_id!r} reads {here / 'photos.parquet'} (a "
        "relative path is taken from the directory the command is typed in): run from that directory, give the path "
        "in full, or set run.run_id",
        f"ingest.local_roots.0: {there / 'photos'} here, but run {run.run_id!r} reads {here / 'photos'} (a relative "
        "path is taken from the directory the command is typed in): run from that directory, give the path in full, "
        "or set run.run_id"]
    assert RunDir(Path("runs"), "x").path == there / "runs" / "x"  # a relative root: this directory's, in full
