"""The stages of the pipeline: what each reads from configuration and upstream, and which core it calls.

Each function maps a :class:`StageContext` onto one pure core; everything else (skip when complete, per-shard
resume, manifests, events) is :func:`infra.stage.run_stage`.
"""

from __future__ import annotations

import pandas as pd

from curation.corpus import build_corpus
from curation.dedup import KEPT, dedup
from curation.embed import embed, load_embeddings
from curation.faces import blur_faces
from curation.ingest import excluded_ids, ingest
from curation.nsfw import dropped_ids, nsfw_filter
from curation.rebalance import SELECTED, rebalance
from curation.retrieve import RETRIEVED, SeedEmbeddings, retrieve
from infra.config import PipelineConfig
from infra.demo.benchmarks import SEGMENTATION_DIR, build_digit_segmentation
from infra.demo.crawl import build_demo_crawl
from infra.shards import list_shards
from infra.stage import StageContext, StageResult, StageSpec


def _crawl(ctx: StageContext) -> StageResult:
    info = build_demo_crawl(ctx.dir, ctx.cfg.demo, ctx.cfg.demo.port, seed=ctx.cfg.run.seed)
    build_digit_segmentation(ctx.dir / "eval" / "mnist", ctx.dir / SEGMENTATION_DIR)
    outputs = [ctx.dir / n for n in ("urls.parquet", "truth.parquet", "crawl.json")]
    return StageResult(counts={"rows": info["rows"], "kinds": info["kinds"]}, outputs=outputs, extra={"port": info["port"]})


def _ingest(ctx: StageContext) -> StageResult:
    return ingest(ctx.cfg.data, ctx.dir, ctx.cfg.ingest, ctx.tracker())


def _nsfw(ctx: StageContext) -> StageResult:
    ingest_dir = ctx.upstream_dir("ingest")
    return nsfw_filter(list_shards(ingest_dir / "shards"), excluded_ids(ingest_dir), ctx.dir, ctx.cfg.nsfw, ctx.tracker())


def _faces(ctx: StageContext) -> StageResult:
    ingest_dir = ctx.upstream_dir("ingest")
    skip = excluded_ids(ingest_dir) | dropped_ids(ctx.upstream_dir("nsfw"))
    return blur_faces(list_shards(ingest_dir / "shards"), skip, ctx.dir, ctx.cfg.faces, ctx.tracker())


def _dedup(ctx: StageContext) -> StageResult:
    shards = list_shards(ctx.upstream_dir("faces") / "shards")
    return dedup(shards, ctx.cfg.data.eval_sets, ctx.dir, ctx.cfg.dedup, ctx.tracker())


def _embed(ctx: StageContext) -> StageResult:
    from flows.models import embedder

    cfg = ctx.cfg
    keep = set(pd.read_parquet(ctx.upstream_dir("dedup") / KEPT, columns=["image_id"])["image_id"])
    shards = list_shards(ctx.upstream_dir("faces") / "shards")
    seeds = [s for s in cfg.data.seed_sets if s.retrieval != "as_is"]

    def make():  # noqa: ANN202
        return embedder(cfg.embed.backbone, f"{cfg.embed.backbone.kind}:{cfg.embed.backbone.arch}",
                        cfg.embed.batch_size, cfg.embed.precision, seed=cfg.run.seed)  # fmt: skip

    return embed(shards, keep, seeds, ctx.dir, make, ctx.tracker())


def _retrieve(ctx: StageContext) -> StageResult:
    emb_dir = ctx.upstream_dir("embed")
    pool_meta, pool_emb = load_embeddings(sorted((emb_dir / "pool").glob("*.npy")))
    seeds = []
    for s in ctx.cfg.data.seed_sets:
        if s.retrieval == "as_is":
            seeds.append(SeedEmbeddings(s, pd.DataFrame(columns=["image_id"]), pool_emb[:0]))
            continue
        meta, emb = load_embeddings([emb_dir / "seeds" / f"{s.name}.npy"])
        seeds.append(SeedEmbeddings(s, meta, emb))
    return retrieve(pool_meta, pool_emb, seeds, ctx.dir, ctx.cfg.retrieve, seed=ctx.cfg.run.seed)


def _rebalance(ctx: StageContext) -> StageResult:
    retrieved = pd.read_parquet(ctx.upstream_dir("retrieve") / RETRIEVED)
    pool_meta, pool_emb = load_embeddings(sorted((ctx.upstream_dir("embed") / "pool").glob("*.npy")))
    pos = pd.Series(range(len(pool_meta)), index=pool_meta["image_id"])
    emb = pool_emb[pos.loc[retrieved["image_id"]].to_numpy()] if len(retrieved) else pool_emb[:0]
    return rebalance(retrieved, emb, ctx.dir, ctx.cfg.rebalance, seed=ctx.cfg.run.seed)


def _corpus(ctx: StageContext) -> StageResult:
    selected = pd.read_parquet(ctx.upstream_dir("rebalance") / SELECTED)
    selected = selected[selected["selected"]]
    stats = pd.read_parquet(ctx.upstream_dir("retrieve") / "seed_stats.parquet")
    as_is = [s for s in ctx.cfg.data.seed_sets if s.retrieval == "as_is" or s.include_as_is]
    return build_corpus(selected, ctx.upstream_dir("faces") / "shards", as_is, stats, ctx.dir, ctx.cfg.corpus)


def _pretrain(ctx: StageContext) -> StageResult:
    from training.pretrain import pretrain

    shards = [s.tar for s in list_shards(ctx.upstream_dir("corpus") / "shards")]
    res = pretrain(shards, ctx.dir, ctx.cfg.train, seed=ctx.cfg.run.seed)
    return StageResult(
        counts={"steps": res.steps},
        outputs=[res.teacher_backbone, res.metrics_csv],
        extra={"final": res.final, "images_per_second": res.images_per_second, "checkpoint": str(res.checkpoint)},
    )


def _evaluate(ctx: StageContext) -> StageResult:
    from evaluation.suite import classification_benchmarks, evaluate
    from flows.models import evaluation_models

    cfg = ctx.cfg
    teacher = ctx.upstream_dir("pretrain") / "teacher_backbone.safetensors"
    benchmarks = classification_benchmarks(cfg.data.eval_sets) + list(cfg.evaluate.benchmarks)
    cache = cfg.evaluate.cache_dir or ctx.run.root / ".cache" / "features"
    return evaluate(benchmarks, evaluation_models(cfg, teacher), cfg.evaluate, ctx.dir, run_id=ctx.run.run_id,
                    cache_dir=cache, table_root=ctx.run.root)  # fmt: skip


CURATION = ("curation", "infra")
SPECS: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("crawl", ("demo", "run.seed"), ("infra",), (), _crawl),
        StageSpec("ingest", ("data", "ingest"), CURATION, (), _ingest),
        StageSpec("nsfw", ("nsfw",), CURATION, ("ingest",), _nsfw),
        StageSpec("faces", ("faces",), CURATION, ("ingest", "nsfw"), _faces),
        StageSpec("dedup", ("dedup", "data"), CURATION, ("faces",), _dedup),
        StageSpec("embed", ("embed", "data", "run.seed"), (*CURATION, "training", "flows"), ("dedup", "faces"), _embed),
        StageSpec("retrieve", ("retrieve", "data", "run.seed"), CURATION, ("embed",), _retrieve),
        StageSpec("rebalance", ("rebalance", "run.seed"), CURATION, ("retrieve", "embed"), _rebalance),
        StageSpec("corpus", ("corpus", "data"), CURATION, ("rebalance", "retrieve", "faces"), _corpus),
        StageSpec("pretrain", ("train", "run.seed"), ("training", "infra"), ("corpus",), _pretrain),
        StageSpec("evaluate", ("evaluate", "data", "train", "run.seed"), ("evaluation", "training", "infra", "flows"),
                  ("pretrain",), _evaluate),  # fmt: skip
    ]
}


def active_stages(cfg: PipelineConfig) -> list[StageSpec]:
    """The stages this configuration runs, in order (``run.stop_after`` truncates)."""
    names = [n for n in SPECS if (n != "crawl" or cfg.demo.enabled)]
    if not cfg.train.enabled:
        names = [n for n in names if n not in ("pretrain", "evaluate")]
    if not cfg.evaluate.enabled and "evaluate" in names:
        names.remove("evaluate")
    if cfg.run.stop_after is not None and cfg.run.stop_after in names:
        names = names[: names.index(cfg.run.stop_after) + 1]
    specs = [SPECS[n] for n in names]
    if cfg.demo.enabled:  # the demo crawl feeds ingest
        specs = [s if s.name != "ingest" else StageSpec(s.name, s.sections, s.packages, ("crawl",), s.fn) for s in specs]
    return specs
