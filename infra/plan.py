"""What a configuration runs: its curation mode, and in words why a stage of the pipeline does not run.

One answer for the flow (which stages it starts), `lvd status` and the report (what was not run, and why), so that
no stage stays "pending" forever because the configuration never meant to run it.
"""

from __future__ import annotations

from typing import Literal

from infra.config import PipelineConfig

# Every stage in pipeline order; the flow's stage table (flows.stages.SPECS) has these names in this order.
STAGES = ("crawl", "ingest", "nsfw", "faces", "dedup", "embed", "retrieve", "rebalance", "corpus", "pretrain",
          "pretrain_highres", "distill", "evaluate")
TRAINING = {"pretrain": None, "pretrain_highres": "highres", "distill": "distill"}  # stage -> `train.<section>`
RETRIEVING = ("sample", "cluster")  # seed-set roles that query the pool (as_is sets go into the corpus as they are)


def retrieval_mode(cfg: PipelineConfig) -> Literal["seeds", "pool"]:
    """`seeds`: retrieval around the curated seed sets (paper §3); `pool`: the whole deduplicated pool goes to
    rebalancing (Vo et al. 2024 need no seeds)."""
    if cfg.retrieve.mode != "auto":
        return cfg.retrieve.mode
    return "seeds" if any(s.retrieval in RETRIEVING for s in cfg.data.seed_sets) else "pool"


def embeds_without_weights(cfg: PipelineConfig) -> bool:
    """The embedder is this project's ViT with no checkpoint: random initialisation."""
    b = cfg.embed.backbone
    return b.kind == "vit" and b.path is None


def has_benchmarks(cfg: PipelineConfig) -> bool:
    """Something to evaluate on (a demo run's benchmarks are filled in when the run is made)."""
    return bool(cfg.data.eval_sets or cfg.evaluate.benchmarks or cfg.demo.enabled)


def listed(cfg: PipelineConfig) -> list[str]:
    """The stages this configuration's pipeline has, in order: the demo's crawl only in a demo run, the optional
    training stages only where enabled (`train.highres`, `train.distill`, and training at all)."""
    out = []
    for name in STAGES:
        if name == "crawl" and not cfg.demo.enabled:
            continue
        section = TRAINING.get(name)
        if section is not None and not (cfg.train.enabled and getattr(cfg.train, section).enabled):
            continue
        out.append(name)
    return out


def not_run(cfg: PipelineConfig) -> dict[str, str]:
    """{stage: why it does not run} for the listed stages this configuration leaves out."""
    why: dict[str, str] = {}
    if not cfg.train.enabled:
        why |= {n: "train.enabled is false" for n in TRAINING}
        why["evaluate"] = "nothing is trained (train.enabled is false)"
    elif not cfg.evaluate.enabled:
        why["evaluate"] = "evaluate.enabled is false"
    elif not has_benchmarks(cfg):
        why["evaluate"] = "no evaluation sets (data.eval_sets and evaluate.benchmarks are empty)"
    stages = listed(cfg)
    stop = cfg.run.stop_after
    if stop is not None and stop in stages:
        why |= {n: f"run.stop_after is {stop}" for n in stages[stages.index(stop) + 1 :] if n not in why}
    return {n: r for n, r in why.items() if n in stages}


def active(cfg: PipelineConfig) -> list[str]:
    """The stages the flow runs, in order."""
    skipped = not_run(cfg)
    return [n for n in listed(cfg) if n not in skipped]
