"""The stages of the pipeline: what each reads from configuration and upstream, and which core it calls.

Each function maps a :class:`StageContext` onto one pure core; everything else (skip when complete, per-shard
resume, manifests, events) is :func:`infra.stage.run_stage`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from itertools import pairwise

import numpy as np
import pandas as pd

from curation.corpus import build_corpus
from curation.dedup import COMPONENTS, KEPT, dedup
from curation.embed import embed, pool_store, seed_store
from curation.faces import blur_faces
from curation.ingest import excluded, ingest
from curation.nsfw import batch_bytes, dropped_ids, nsfw_filter
from curation.rebalance import SELECTED, rebalance
from curation.retrieve import RETRIEVED, SEED_STATS, SeedQueries, retrieve
from curation.truth import assert_eval_copies_removed, score_dedup
from curation.urls import url_list_fingerprint
from curation.vectors import RowView, VectorStore
from flows.resume_points import TRAINING_STAGES, resume_step  # light, for `lvd status`: they moved there
from infra import plan
from infra.config import PipelineConfig
from infra.config.run import RunConfig
from infra.config.schema import config_hash
from infra.config.train import EXECUTION_KEYS, TrainConfig
from infra.cpus import resolve, shards_and_threads
from infra.demo.benchmarks import SEGMENTATION_DIR, build_digit_segmentation
from infra.demo.crawl import build_demo_crawl
from infra.errors import InputProblem
from infra.manifest import read_manifest
from infra.run import RunDir
from infra.shards import list_shards
from infra.stage import StageContext, StageResult, StageSpec
from infra.storage import files_fingerprint

log = logging.getLogger("lvd")


def _crawl(ctx: StageContext) -> StageResult:
    info = build_demo_crawl(ctx.dir, ctx.cfg.demo, ctx.cfg.demo.port, seed=ctx.cfg.run.seed)
    build_digit_segmentation(ctx.dir / "eval" / "mnist", ctx.dir / SEGMENTATION_DIR)
    outputs = [ctx.dir / n for n in ("urls.parquet", "truth.parquet", "crawl.json")]
    return StageResult(counts={"rows": info["rows"], "kinds": info["kinds"]}, outputs=outputs, extra={"port": info["port"]})


def _ingest(ctx: StageContext) -> StageResult:
    from flows.fanout import prefect_mapper

    mapper = prefect_mapper(ctx.cfg.run, "ingest", ctx.cfg.ingest.processes)
    return ingest(ctx.cfg.data, ctx.dir, ctx.cfg.ingest, ctx.tracker(), mapper, ctx.previous)


def _nsfw(ctx: StageContext) -> StageResult:
    from flows.fanout import prefect_mapper

    ingest_dir = ctx.upstream_dir("ingest")
    shards = list_shards(ingest_dir / "shards")
    skip = excluded(ingest_dir)
    tracker = ctx.tracker(len(shards), ctx.shard_inputs([s.name for s in shards], ["ingest"], skip))
    pending = sum(not tracker.is_done(s.name) for s in shards)
    width, cap = memory_width(ctx.cfg.run, "nsfw", pending, batch_bytes(ctx.cfg.nsfw), "nsfw.batch_size")
    mapper = prefect_mapper(ctx.cfg.run, "nsfw", width)
    return nsfw_filter(shards, skip, ctx.dir, ctx.cfg.nsfw, tracker, mapper, width, cap)


def memory_width(run: RunConfig, stage: str, tasks: int, per_batch: int, lower: str) -> tuple[int | str, int | None]:
    """Shards in flight for a stage whose every thread holds a batch of `per_batch` bytes, and the batches the run's
    memory holds at once (None: as many as the CPUs ask): on a machine with many CPUs and little memory (a container's
    limit) `auto` would start one batch per CPU, and the out-of-memory killer end the run. On a cluster at an address
    each worker has its own memory: `run.workers` is left as it is."""
    from flows.cluster import address
    from infra.memory import gib, memory_budget, memory_cap, tree_rss

    width = run.workers
    if address(run) is not None or tasks == 0:
        return width, None
    budget, used = memory_budget(), tree_rss()
    cap = memory_cap(per_batch, budget, used)
    shards, threads = shards_and_threads(tasks, width)
    if shards * threads <= cap:
        return width, None
    log.info("%s: %d batch%s at once, not %d: each holds ~%s, and the run may use %s, %s of it in use (%s lowers "
             "a batch)", stage, cap, "es" if cap != 1 else "", shards * threads, gib(per_batch), gib(budget.bytes),
             gib(used), lower)  # fmt: skip
    return min(shards, cap), cap


def _faces(ctx: StageContext) -> StageResult:
    from flows.fanout import prefect_mapper

    ingest_dir = ctx.upstream_dir("ingest")
    shards = list_shards(ingest_dir / "shards")
    dup, nsfw = excluded(ingest_dir), dropped_ids(ctx.upstream_dir("nsfw"))
    skip = {s.name: dup.get(s.name, set()) | nsfw for s in shards}
    # A shard's NSFW drops are in its NSFW scores file, fingerprinted with its ingest shard.
    tracker = ctx.tracker(len(shards), ctx.shard_inputs([s.name for s in shards], ["ingest", "nsfw"], dup))
    return blur_faces(shards, skip, ctx.dir, ctx.cfg.faces, tracker, prefect_mapper(ctx.cfg.run, "faces"),
                      ctx.cfg.run.workers)


def _fanout(cfg: PipelineConfig) -> bool:
    """Model stages (descriptors, embedding) send shards to the task runner only on a cluster (Dask, Ray): one
    model per worker process. On threads they stay in the flow's process, one model for all."""
    return cfg.run.task_runner != "thread"


def _dedup(ctx: StageContext) -> StageResult:
    from flows.fanout import prefect_mapper

    cfg = ctx.cfg
    shards = list_shards(ctx.upstream_dir("faces") / "shards")
    mapper = prefect_mapper(cfg.run, "dedup", gpu=True) if _fanout(cfg) else None
    key = config_hash(cfg, DESCRIPTOR_SECTIONS) + _descriptor_model(cfg)
    tracker = ctx.tracker(len(shards), ctx.shard_inputs([s.name for s in shards], ["faces"]))  # descriptors per shard
    result = dedup(shards, cfg.data.eval_sets, ctx.dir, cfg.dedup, tracker, seed=cfg.run.seed, mapper=mapper,
                   descriptor_key=key)  # fmt: skip
    truth = ctx.upstream_dir("crawl") / "truth.parquet"
    if ctx.cfg.demo.enabled and ctx.cfg.dedup.enabled and truth.is_file():  # the demo knows what it planted: insist
        report = score_dedup(pd.read_parquet(ctx.dir / COMPONENTS), pd.read_parquet(truth))
        result.extra["truth"] = report
        assert_eval_copies_removed(report)
    return result


def _embed(ctx: StageContext) -> StageResult:
    from flows.fanout import prefect_mapper
    from flows.models import embedder

    cfg = ctx.cfg
    kept = pd.read_parquet(ctx.upstream_dir("dedup") / KEPT, columns=["image_id", "shard"])
    keep = set(kept["image_id"])
    shards = list_shards(ctx.upstream_dir("faces") / "shards")
    seeds = [s for s in cfg.data.seed_sets if s.retrieval != "as_is"]

    b = cfg.embed.backbone
    make = partial(embedder, b, b.label, cfg.embed.batch_size, cfg.embed.precision, seed=cfg.run.seed)
    key = config_hash(cfg, ("embed", "run.seed")) + _embedder(cfg)  # everything that defines the model
    # A shard task per pool shard (fingerprinted with the shard's kept images), one per seed set (always embedded).
    inputs = ctx.shard_inputs([s.name for s in shards], ["faces"], kept.groupby("shard")["image_id"].agg(list).to_dict())
    tracker = ctx.tracker(len(shards) + len(seeds), inputs)
    return embed(shards, keep, seeds, ctx.dir, make, tracker, cfg.embed.device, resolve(cfg.embed.decode_threads),
                 mapper=prefect_mapper(cfg.run, "embed", gpu=True) if _fanout(cfg) else None, embedder_key=key)  # fmt: skip


def _retrieve(ctx: StageContext) -> StageResult:
    emb_dir = ctx.upstream_dir("embed")
    pool_meta, pool = pool_store(emb_dir)
    seeds = []
    for s in ctx.cfg.data.seed_sets:
        if s.retrieval == "as_is":
            seeds.append(SeedQueries(s, pd.DataFrame(columns=["image_id"]), VectorStore([])))
        else:
            seeds.append(SeedQueries(s, *seed_store(emb_dir, s.name)))
    return retrieve(pool_meta, RowView(pool), seeds, ctx.dir, ctx.cfg.retrieve, seed=ctx.cfg.run.seed,
                    mode=plan.retrieval_mode(ctx.cfg))


def _rebalance(ctx: StageContext) -> StageResult:
    retrieved = pd.read_parquet(ctx.upstream_dir("retrieve") / RETRIEVED)
    _, pool = pool_store(ctx.upstream_dir("embed"))
    points = RowView(pool, retrieved["pos"].to_numpy(dtype=np.int64))  # memory-mapped rows of the retrieved images
    return rebalance(retrieved.drop(columns=["pos"]), points, ctx.dir, ctx.cfg.rebalance, seed=ctx.cfg.run.seed)


def _corpus(ctx: StageContext) -> StageResult:
    selected = pd.read_parquet(ctx.upstream_dir("rebalance") / SELECTED)
    selected = selected[selected["selected"]]
    stats = pd.read_parquet(ctx.upstream_dir("retrieve") / SEED_STATS)
    as_is = [s for s in ctx.cfg.data.seed_sets if s.retrieval == "as_is" or s.include_as_is]
    if selected.empty and not as_is:
        raise EmptyCorpusError(f"no image reached the corpus: {where_images_went(ctx.run)}")
    return build_corpus(selected, ctx.upstream_dir("faces") / "shards", as_is, stats, ctx.dir, ctx.cfg.corpus,
                        ingest_shard_dir=ctx.upstream_dir("ingest") / "shards",
                        encode=(ctx.cfg.ingest.encode_format, ctx.cfg.ingest.encode_quality))


class EmptyCorpusError(RuntimeError, InputProblem):
    """Nothing to train on: every row of the list was dropped before the corpus (and no seed set is added as is)."""


def where_images_went(run: RunDir) -> str:
    """The first curation stage that kept no image, with its drop reasons (the ledger has each row's)."""
    for name in ("ingest", "nsfw", "faces", "dedup", "embed", "retrieve", "rebalance"):
        m = read_manifest(run.stage_dir(name))
        if m is None or m.counts.get("kept", 1):
            continue
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(m.counts.get("dropped", {}).items(), key=lambda x: -x[1])
                            if n)  # fmt: skip
        if name == "ingest":
            hint = ""
            if m.counts.get("dropped", {}).get("path_outside_roots"):
                hint = "; the list's files lie outside ingest.local_roots: set it to the folder they are in"
            return (f"ingest kept none of the list's {m.counts.get('rows', 0):,} rows ({reasons or 'no rows'}){hint}; "
                    f"every row's reason: lvd lineage {run.run_id} row:N, per host: lvd domains {run.run_id}")
        return f"{name} kept none of its input ({reasons or 'nothing came in'})"
    return "the rebalanced selection is empty"


TEACHER_BUNDLE = "teacher_checkpoint.safetensors"  # backbone + heads a training stage exports for the next one
TEACHER_BACKBONE = "teacher_backbone.safetensors"  # what evaluation reads


def training_stages(cfg: PipelineConfig) -> list[str]:
    """The training stages this configuration runs: pretrain, then the enabled follow-ups (`train.highres`,
    `train.distill`), each continuing from the previous one's teacher bundle."""
    if not cfg.train.enabled:
        return []
    return [n for n, section in TRAINING_STAGES.items() if section is None or getattr(cfg.train, section).enabled]


def missing_exports(run: RunDir, cfg: PipelineConfig, stage: str) -> list[str]:
    """The `train.exports` formats a training stage's folder lacks."""
    from flows.export import EXPORT_DIRS

    return [f for f in stage_train_config(cfg, run, stage).exports if not (run.stage_dir(stage) / EXPORT_DIRS[f]).exists()]


def complete_exports(run: RunDir, cfg: PipelineConfig, stage: str) -> list[str]:
    """The `train.exports` formats a complete training stage lacks, written now from its teacher: `exports` is not in
    the stage's key, so a stage taken from another run (or trained before the setting changed) was exported as that
    run asked. Its manifest keeps listing what the stage wrote when it trained."""
    from flows.export import EXPORT_DIRS, export_stage

    missing = missing_exports(run, cfg, stage)
    evaluates = training_stages(cfg)[-1] if "evaluate" in plan.active(cfg) else None
    for fmt in missing:
        export_stage(run, stage, fmt, run.stage_dir(stage) / EXPORT_DIRS[fmt], evaluates)
    return missing


def stage_train_config(cfg: PipelineConfig, run: RunDir, stage: str) -> TrainConfig:
    """What a training stage trains: the `train` section (pretrain), or a follow-up's stage configuration started
    from the previous training stage's bundle (`TrainConfig.highres_stage` / `distill_stage`)."""
    stages = training_stages(cfg)
    i = stages.index(stage)
    if i == 0:
        return cfg.train
    bundle = run.stage_dir(stages[i - 1]) / TEACHER_BUNDLE
    return cfg.train.highres_stage(bundle) if stage == "pretrain_highres" else cfg.train.distill_stage(bundle)


def _train(ctx: StageContext) -> StageResult:
    from flows.export import write_stage_exports
    from flows.progress import TrainingProgress
    from training.launch import pretrain_on_host
    from training.pretrain import host_processes

    train = stage_train_config(ctx.cfg, ctx.run, ctx.name)
    step = resume_step(ctx.dir)
    if step is not None:  # the run's record of where the interrupted training continues (lineage of a resume)
        ctx.run.log_event("training_resumed", ctx.name, step=step)
    # In child processes (torchrun) training reports to the stage's launch.log: this process shows its progress.
    with TrainingProgress(ctx.dir, ctx.run.run_id, ctx.name, console=host_processes(train) > 1):
        res = pretrain_on_host(ctx.upstream_dir("corpus") / "shards", ctx.dir, train, seed=ctx.cfg.run.seed)
    evaluates = training_stages(ctx.cfg)[-1] if "evaluate" in plan.active(ctx.cfg) else None
    exports = write_stage_exports(ctx.run, ctx.name, train.exports, evaluates)  # hf/ (+ model card), timm/
    return StageResult(
        counts={"steps": res.steps},
        outputs=[res.teacher_backbone, res.teacher_bundle, res.metrics_csv, *exports],
        extra={"final": res.final, "images_per_second": res.images_per_second, "checkpoint": str(res.checkpoint),
               "mode": train.mode, "arch": train.student.arch, "image_size": train.crops.global_crops_size},
    )


def _evaluate(ctx: StageContext) -> StageResult:
    from evaluation.results import RESULTS
    from evaluation.suite import classification_benchmarks, evaluate
    from flows.export import complete_card
    from flows.models import evaluation_models

    cfg = ctx.cfg
    final = training_stages(cfg)[-1]  # the last training stage's export is the run's model
    teacher = ctx.upstream_dir(final) / TEACHER_BACKBONE
    models = evaluation_models(cfg, teacher, stage_train_config(cfg, ctx.run, final))
    benchmarks = classification_benchmarks(cfg.data.eval_sets) + list(cfg.evaluate.benchmarks)
    cache = cfg.evaluate.cache_dir or ctx.run.root / ".cache" / "features"
    result = evaluate(benchmarks, models, cfg.evaluate, ctx.dir, run_id=ctx.run.run_id,
                      cache_dir=cache, table_root=ctx.run.root)  # fmt: skip
    card = complete_card(ctx.run, final, pd.read_parquet(ctx.dir / RESULTS))  # the evaluated model's hf/README.md
    return replace(result, outputs=[*result.outputs, card]) if card else result


# Files a stage reads from outside the run, fingerprinted into its key (StageSpec.external): an edited URL list or
# model file replaced at the same path makes the stage stale.
def _url_list(cfg: PipelineConfig) -> str:
    return url_list_fingerprint(cfg.data)


def _nsfw_models(cfg: PipelineConfig) -> str:
    return files_fingerprint([cfg.nsfw.encoder_path, cfg.nsfw.head_path])


def _face_model(cfg: PipelineConfig) -> str:
    return files_fingerprint([cfg.faces.model_path])


def _descriptor_model(cfg: PipelineConfig) -> str:
    return files_fingerprint([cfg.dedup.descriptor.path])


def _embedder(cfg: PipelineConfig) -> str:
    return files_fingerprint([cfg.embed.backbone.path])


def _evaluated_models(cfg: PipelineConfig) -> str:
    return files_fingerprint([m.backbone.path for m in cfg.evaluate.models])


DESCRIPTOR_SECTIONS = ("dedup.descriptor",)  # what the dedup stage's per-shard copy descriptors depend on
# What training learns: the train section without how it executes (EXECUTION_KEYS: devices, micro-batches, workers,
# threads, ...; `lvd resume` may change them). A training stage's key leaves out the follow-up sections too (each
# follow-up adds its own).
LEARNED = tuple(f"train.{k}" for k in TrainConfig.model_fields if k not in EXECUTION_KEYS)
TRAIN = tuple(k for k in LEARNED if k.removeprefix("train.") not in TRAINING_STAGES.values())
SPECS: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("crawl", ("demo", "run.seed"), (), _crawl),
        StageSpec("ingest", ("data", "ingest"), (), _ingest, external=_url_list, salvage="external"),
        # Shard-wise (dedup: its descriptors): a shard whose upstream shard is unchanged is not computed again.
        StageSpec("nsfw", ("nsfw",), ("ingest",), _nsfw, external=_nsfw_models, salvage="upstream"),
        StageSpec("faces", ("faces",), ("ingest", "nsfw"), _faces, external=_face_model, salvage="upstream"),
        StageSpec("dedup", ("dedup", "data", "demo.enabled", "run.seed"), ("faces",), _dedup,
                  external=_descriptor_model, salvage="upstream", shard_sections=DESCRIPTOR_SECTIONS),
        StageSpec("embed", ("embed", "data", "run.seed"), ("dedup", "faces"), _embed,
                  external=_embedder, salvage="upstream"),
        StageSpec("retrieve", ("retrieve", "data", "run.seed"), ("embed",), _retrieve),
        StageSpec("rebalance", ("rebalance", "run.seed"), ("retrieve", "embed"), _rebalance),
        StageSpec("corpus", ("corpus", "data", "ingest.encode_format", "ingest.encode_quality"),
                  ("rebalance", "retrieve", "faces", "ingest"), _corpus),
        StageSpec("pretrain", (*TRAIN, "run.seed"), ("corpus",), _train),
        # Upstream: the previous training stage (see active_stages); the section enabling them is in their key.
        StageSpec("pretrain_highres", (*TRAIN, "train.highres", "run.seed"), ("corpus", "pretrain"), _train),
        StageSpec("distill", (*TRAIN, "train.distill", "run.seed"), ("corpus", "pretrain"), _train),
        StageSpec("evaluate", ("evaluate", "data", *LEARNED, "run.seed"), ("pretrain",), _evaluate,
                  external=_evaluated_models),
    ]
}


def active_stages(cfg: PipelineConfig) -> list[StageSpec]:
    """The stages this configuration runs, in order (`infra.plan`: the others, and why, for status and the report)."""
    trained = training_stages(cfg)
    names = plan.active(cfg)
    specs = [SPECS[n] for n in names]
    if cfg.demo.enabled:  # the demo crawl feeds ingest
        specs = [s if s.name != "ingest" else StageSpec(s.name, s.sections, ("crawl",), s.fn) for s in specs]
    # A follow-up continues the previous training stage; evaluation takes the last one's export.
    rewire = {stage: ("corpus", before) for before, stage in pairwise(trained)}
    if trained:
        rewire["evaluate"] = (trained[-1],)
    return [replace(s, upstream=rewire.get(s.name, s.upstream)) for s in specs]
