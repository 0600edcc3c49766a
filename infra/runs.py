"""Turn a configuration into a run: its id, its directory and the resolved configuration written into it."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from infra import plan
from infra.config import ConfigError, PipelineConfig, config_hash, load_config, to_yaml
from infra.config.data import EvalSetConfig, SeedSetConfig
from infra.config.schema import EXECUTION_KEYS as CURATION_EXECUTION_KEYS
from infra.config.schema import absolute_paths, path_values, select
from infra.config.train import EXECUTION_KEYS, TrainConfig
from infra.demo.server import free_port
from infra.run import RunDir, derive_run_id, now
from infra.storage import atomic_write_json, atomic_write_text, read_json

RUN_INFO = "run.json"
# How a run executes, not what its stages compute (no stage key reads them; tests/infra/test_runs.py checks):
# `lvd resume RUN_ID key=value ...` may change these, e.g. to add shard retries or a Dask cluster after a failure.
RESUME_OVERRIDABLE = ("run.task_runner", "run.workers", "run.dask_address", "run.shard_retries",
                      "run.shard_retry_delay_s", "run.shard_timeout_s", "run.ray_address", "run.ray_gpus_per_task",
                      *CURATION_EXECUTION_KEYS, *(f"train.{k}" for k in EXECUTION_KEYS))


def _lanes(train: TrainConfig) -> int | None:
    """Batches per optimiser step over the whole run (processes x micro-batches); None while `devices` is `auto`."""
    return None if train.devices == "auto" else train.devices * train.num_nodes * train.accumulate_grad_batches


# More problems of a configuration (e.g. its model files), given the run it is for (an existing run's complete
# stages need no check).
Checks = Callable[[PipelineConfig, RunDir], list[str]]


def resolve(cfg: PipelineConfig, run: RunDir, checks: Checks | None = None) -> PipelineConfig:
    """Fill what is known only once the run exists: absolute paths, and the demo crawl's inputs and port."""
    problems = _check_demo(cfg)  # before the demo fills in its inputs
    cfg = absolute_paths(cfg)  # relative paths are the command's: saved as the files they name now
    cfg.run.run_id = run.run_id
    cfg.run.root = run.root.resolve()
    if cfg.demo.enabled:
        cfg.demo.port = cfg.demo.port or free_port()
        crawl = run.stage_dir("crawl").resolve()
        cfg.data.url_list = crawl / "urls.parquet"
        if not cfg.data.seed_sets:  # the seed set in every Table-15 role: sample-based (+ as is) and cluster-based
            seeds = crawl / "seeds" / "mnist"
            cfg.data.seed_sets = [SeedSetConfig(name="mnist", path=seeds, retrieval="sample", include_as_is=True),
                                  SeedSetConfig(name="mnist-clusters", path=seeds, retrieval="cluster")]  # fmt: skip
        if not cfg.data.eval_sets:
            cfg.data.eval_sets = [
                EvalSetConfig(name="mnist", train=crawl / "eval" / "mnist" / "train", test=crawl / "eval" / "mnist" / "test")
            ]
        if not cfg.evaluate.benchmarks:
            from infra.demo.benchmarks import demo_benchmarks

            cfg.evaluate.benchmarks = demo_benchmarks(crawl)
    problems += _check_inputs(cfg) + _check_plan(cfg) + _check_writable(run.root) + (checks(cfg, run) if checks else [])
    if problems:
        raise ConfigError(problems, "configuration")
    return cfg


def _moved(cfg: PipelineConfig, saved: PipelineConfig, run_id: str) -> list[str]:
    """The same configuration typed in another directory: its relative paths name other files than the run's."""
    now, then = path_values(absolute_paths(cfg)), path_values(saved)
    return [f"{key}: {now[key]} here, but run {run_id!r} reads {then[key]} (a relative path is taken from the "
            "directory the command is typed in): run from that directory, give the path in full, or set run.run_id"
            for key in sorted(now.keys() & then.keys())
            if key != "run.root" and Path(then[key]).is_absolute() and now[key] != then[key]]


def _check_demo(cfg: PipelineConfig) -> list[str]:
    """The demo builds its own crawl: a list or folder given beside it would be silently replaced."""
    if not cfg.demo.enabled:
        return []
    problems = []
    if cfg.data.url_list is not None:
        problems.append(f"data.url_list: {cfg.data.url_list} is given while demo.enabled is true, and the demo crawls "
                        "its own list: set demo.enabled=false to curate your list (e.g. start from "
                        "configs/own_urls.yaml or configs/own_folder.yaml)")
    if cfg.ingest.local_roots:
        problems.append(f"ingest.local_roots: {[str(p) for p in cfg.ingest.local_roots]} is given while demo.enabled "
                        "is true, and the demo crawls its own list: set demo.enabled=false to curate your folder "
                        "(configs/own_folder.yaml)")
    return problems


def _check_plan(cfg: PipelineConfig) -> list[str]:
    """Stages whose inputs can never exist, and an embedder that would silently be random."""
    problems = []
    retrieving = [s.name for s in cfg.data.seed_sets if s.retrieval in plan.RETRIEVING]
    if cfg.retrieve.mode == "seeds" and not retrieving and not cfg.demo.enabled:
        problems.append("retrieve.mode: seeds, but no seed set retrieves (data.seed_sets with retrieval: sample or "
                        "cluster): add one, or set retrieve.mode=auto (without seed sets, rebalancing samples the "
                        "whole deduplicated pool)")
    active = plan.active(cfg)
    if "embed" in active and plan.embeds_without_weights(cfg) and not cfg.embed.allow_random_init:
        b = cfg.embed.backbone
        problems.append(f"embed.backbone: {b.kind}:{b.arch} without `path` is a randomly initialised network, and "
                        "retrieval and rebalancing on its embeddings are noise. Give it weights: "
                        "`embed.backbone: {kind: dinov2, path: models/dinov2_vits14_pretrain.pth, image_size: 224}` "
                        "(`lvd models fetch dinov2_vits14` where online), a timm checkpoint (kind: timm), or a model "
                        "this project trained (kind: vit, path: runs/<run>/stages/pretrain/teacher_backbone.safetensors); "
                        "or set embed.allow_random_init=true to run with random weights knowingly")
    return problems


def _check_writable(root: Path) -> list[str]:
    """The runs folder must be creatable and take a file, before any work starts: tried with a temporary file in it or
    in its nearest existing parent, not inferred from permission bits (root ignores them, and a read-only mount or a
    full disk does not show in them). Nothing is left behind."""
    root = Path(root).absolute()
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        return [f"run.root: {root} cannot be created ({existing} is not a folder); choose another with run.root=DIR"]
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return [f"run.root: {root} cannot be written ({err.strerror or type(err).__name__} in {existing}); choose "
                "another with run.root=DIR"]
    return []


def _check_inputs(cfg: PipelineConfig) -> list[str]:
    problems = []
    if cfg.data.url_list is None:
        problems.append("data.url_list: required (a URL list: parquet, CSV, TSV, JSON(L) or text, or a folder of "
                        "them), or set demo.enabled=true")
    if cfg.demo.enabled:
        return problems  # the demo builds its inputs at run time
    if cfg.data.url_list is not None and not Path(cfg.data.url_list).exists():
        problems.append(f"data.url_list: {cfg.data.url_list} does not exist")
    for s in cfg.data.seed_sets:
        if not Path(s.path).exists():
            problems.append(f"data.seed_sets[{s.name}].path: {s.path} does not exist")
    for e in cfg.data.eval_sets:
        for split in ("train", "test", "val"):
            p = getattr(e, split)
            if p is not None and not Path(p).exists():
                problems.append(f"data.eval_sets[{e.name}].{split}: {p} does not exist")
    # Benchmarks and reference checkpoints are read only at the end of a run: check them before hours of work.
    for b in cfg.evaluate.benchmarks:
        for key in ("train", "test", "val", "images", "gnd", "ground_truth", "references", "root"):
            p = getattr(b, key, None)
            if p is not None and not Path(p).exists():
                problems.append(f"evaluate.benchmarks[{b.name}].{key}: {p} does not exist")
    # The URL list's files and model files (embedder, evaluated checkpoints, NSFW, faces, SSCD) are opened and probed
    # by the `checks` the CLI passes to prepare_run (flows.preflight.check_run_inputs), listed with these.
    return problems


def prepare_run(config_path: Path | str | None, overrides: Iterable[str] = (),
                checks: Checks | None = None, write: bool = True) -> tuple[RunDir, PipelineConfig]:
    """Load and validate (every problem at once, `checks` included); the same configuration maps to the same run
    (reused, its saved configuration checked again by `checks`), a new one to a new run (`write=False`: its folder
    is not created)."""
    cfg = load_config(config_path, list(overrides))
    run_id = cfg.run.run_id or derive_run_id(Path(config_path) if config_path else None, cfg)
    run = RunDir(cfg.run.root, run_id)
    source_hash = config_hash(cfg)
    if run.exists():
        info = read_json(run.path / RUN_INFO) if (run.path / RUN_INFO).is_file() else {}
        if info.get("source_config_hash") not in (None, source_hash):
            raise ConfigError([f"run {run_id!r} already exists with a different configuration; set run.run_id"])
        saved = run.load_config()
        problems = _moved(cfg, saved, run_id) + (checks(saved, run) if checks else [])
        if problems:
            raise ConfigError(problems, "configuration")
        return run, saved
    resolved = resolve(cfg, run, checks)
    if not write:
        return run, resolved
    run.save_config(resolved)
    atomic_write_json(
        run.path / RUN_INFO,
        {"run_id": run_id, "created": now(), "config_file": str(config_path) if config_path else None,
         "source_config_hash": source_hash},
    )
    return run, resolved


def amend_run(run: RunDir, overrides: Iterable[str]) -> dict[str, tuple[object, object]]:
    """Apply execution-only overrides (`RESUME_OVERRIDABLE`) to an existing run's resolved config, in place; every
    finished stage and shard stays valid. Returns {key: (old, new)} for the values that changed."""
    overrides = list(overrides)
    keys = [text.partition("=")[0].strip() for text in overrides]
    refused = [k for k in keys if k not in RESUME_OVERRIDABLE]
    if refused:
        raise ConfigError([f"{k}: a resumed run keeps its configuration; only how it executes may change "
                           f"({', '.join(RESUME_OVERRIDABLE)}). Anything else changes what its stages compute: "
                           "start a new run (lvd run CONFIG ...)" for k in refused], source=f"resume {run.run_id}")
    old = run.load_config()
    if not overrides:
        return {}
    new = load_config(run.config_path, overrides)
    lanes = _lanes(old.train), _lanes(new.train)
    if None not in lanes and lanes[0] != lanes[1]:
        t = old.train
        raise ConfigError([f"train.devices x train.num_nodes x train.accumulate_grad_batches: {lanes[1]} batches per "
                           f"step where the run has {lanes[0]} ({t.devices} x {t.num_nodes} x "
                           f"{t.accumulate_grad_batches}): the global batch, the lr scaled from it and the data order "
                           "would change. Keep the product (e.g. half the devices, twice the micro-batches)"],
                          source=f"resume {run.run_id}")
    before, after = select(old, keys), select(new, keys)
    changed = {k: (before[k], after[k]) for k in sorted(set(keys)) if before[k] != after[k]}
    if changed:
        atomic_write_text(run.config_path, to_yaml(new))
        run.log_event("config_amended", changed={k: {"old": a, "new": b} for k, (a, b) in changed.items()})
    return changed


def open_run(root: Path | str, run_id: str) -> tuple[RunDir, PipelineConfig]:
    run = RunDir(Path(root), run_id)
    return run, run.load_config()
