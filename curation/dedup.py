"""Copy-detection dedup (paper §A.3).

1. Descriptors: every pool image is described (SSCD, or the pixel baseline) per shard, with per-shard resume;
   the index holds the whole-image descriptor, queries use every configured view (crops, mirror images).
2. Self-dedup: kNN graph (k=64) over the pool, edges with cosine > 0.6, connected components by union-find, one
   representative per component (``dedup.representative``: the member seen first in the crawl, or the one with
   the most pixels). The others are dropped as ``near_duplicate`` with component and representative recorded.
3. Relative dedup against every split of every evaluation set: pool <-> evaluation kNN edges and pool edges with
   cosine > 0.45, on top of the self-dedup components; every component that contains an evaluation image is
   dropped whole (``eval_contamination``), with the evaluation image that caused it (the one with the strongest
   direct edge into the component) and that edge's similarity. One kNN search of the pool serves both steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from curation.descriptors import Descriptor, Whitener, build_descriptor, describe, n_views, score_norm_offsets
from curation.graph import Edges, QueryViews, UnionFind, components, edge_recall, exact_edges, knn_edges
from curation.index import SearchIndex, build_index
from curation.ivf_blocks import BlockedIVF
from curation.vectors import RowView, VectorStore, VectorWriter, write_vectors
from infra.config.curation import DedupConfig, IndexConfig
from infra.config.data import EvalSetConfig
from infra.datasets import decode_item, iter_images
from infra.images import decode
from infra.lineage import LedgerParts, ledger_dir
from infra.shards import Shard, iter_shard_images
from infra.stage import ShardTracker, StageResult
from infra.storage import atomic_path, sha256_file
from infra.workers import claim_worker_gpu, process_cached

DESCRIPTORS = "descriptors"
KEPT = "kept.parquet"
COMPONENTS = "components.parquet"
QUERY_CHUNK = 4096
BLOCK_QUERY_CHUNK = 131_072
DECODE_BATCH = 256


def _batches(shard: Shard) -> Iterator[tuple[list[dict], list[Image.Image]]]:
    metas, images = [], []
    for meta, data in iter_shard_images(shard):
        metas.append(meta)
        images.append(decode(data))
        if len(images) == DECODE_BATCH:
            yield metas, images
            metas, images = [], []
    if images:
        yield metas, images


def describe_shard(shard: Shard, descriptor: Descriptor, cfg: DedupConfig, out_dir: Path) -> dict[str, int]:
    """``<shard>.npy`` (n, V, D) fp16 view descriptors and ``<shard>.parquet`` (image_id, row_id, shard, pixels)."""
    rows, parts = [], []
    for metas, images in _batches(shard):
        parts.append(describe(images, descriptor, cfg.descriptor))
        rows += [{"image_id": m["image_id"], "row_id": int(m["row_id"]), "shard": shard.name,
                  "pixels": int(im.width * im.height)} for m, im in zip(metas, images, strict=True)]  # fmt: skip
    dim = next((p.shape[-1] for p in parts if p.size), 1)
    views = np.concatenate(parts) if parts else np.zeros((0, n_views(cfg.descriptor), dim), np.float32)
    write_vectors(out_dir / f"{shard.name}.npy", views)
    with atomic_path(out_dir / f"{shard.name}.parquet") as tmp:
        pd.DataFrame(rows, columns=["image_id", "row_id", "shard", "pixels"]).to_parquet(tmp, index=False)
    return {"images": len(rows)}


def describe_job(shard: Shard, cfg: DedupConfig, out_dir: Path, key: str) -> tuple[str, dict[str, int]]:
    """:func:`describe_shard` in whichever process runs it (a Dask/Ray worker): the copy-detection model is built
    once per process and ``key`` (descriptor config and model file) names it; a worker on a multi-GPU host uses its
    own GPU."""

    def build() -> Descriptor:
        claim_worker_gpu()  # build_descriptor moves the model to the current device
        return build_descriptor(cfg.descriptor)

    return shard.name, describe_shard(shard, process_cached(f"dedup:{key}", build), cfg, out_dir)


@dataclass
class Described:
    """Descriptors of a node set: query views (memory-mapped) and the whole-image vectors the index holds."""

    meta: pd.DataFrame
    views: VectorStore  # (n, V, D)
    base: RowView  # (n, D)
    whitener: Whitener | None = None

    def queries(self, offsets: Callable[[np.ndarray], np.ndarray] | None = None) -> QueryViews:
        return QueryViews(self.views, self.whitener, offsets)


def _base_vectors(views: VectorStore, whitener: Whitener | None, path: Path) -> RowView:
    """View 0 of every node (whitened when configured), written once as fp16 for the index."""
    writer = VectorWriter(path, len(views), views.dim if whitener is None else whitener.proj.shape[1])
    for _, block in views.chunks():
        writer.add(whitener(block[:, 0]) if whitener else block[:, 0])
    return RowView(VectorStore([writer.close()]))


def load_described(stage_dir: Path, shards: list[Shard], cfg: DedupConfig, seed: int) -> Described:
    d = stage_dir / DESCRIPTORS
    views = VectorStore([d / f"{s.name}.npy" for s in shards])
    meta = pd.concat([pd.read_parquet(d / f"{s.name}.parquet") for s in shards], ignore_index=True)
    whitener = None
    if cfg.descriptor.whitening != "none" and len(views) > 1:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(views), min(len(views), cfg.descriptor.whitening_sample), replace=False))
        whitener = Whitener.fit(views.take(rows)[:, 0], cfg.descriptor.whitening, cfg.descriptor.whitening_dim)
    return Described(meta, views, _base_vectors(views, whitener, stage_dir / "index_vectors.npy"), whitener)


def eval_described(eval_sets: list[EvalSetConfig], descriptor: Descriptor, cfg: DedupConfig, stage_dir: Path,
                   whitener: Whitener | None) -> Described:  # fmt: skip
    """Every image of every split (train, test, val) of every evaluation set."""
    metas, parts, images = [], [], []

    def flush() -> None:
        if images:
            parts.append(describe(images, descriptor, cfg.descriptor))
            images.clear()

    for ev in eval_sets:
        for split, path in (("train", ev.train), ("test", ev.test), ("val", ev.val)):
            for item in iter_images(path, ev.format) if path is not None else ():
                metas.append({"eval_image": f"{ev.name}/{split}/{item.name}", "eval_image_id": item.image_id})
                images.append(decode_item(item, f"data.eval_sets[{ev.name}].{split} ({path})"))
                if len(images) == DECODE_BATCH:
                    flush()
    flush()
    dim = next((p.shape[-1] for p in parts), 1)
    arr = np.concatenate(parts) if parts else np.zeros((0, n_views(cfg.descriptor), dim), np.float32)
    views = VectorStore.from_array(arr, stage_dir / "eval_descriptors.npy")
    meta = pd.DataFrame(metas, columns=["eval_image", "eval_image_id"])
    return Described(meta, views, _base_vectors(views, whitener, stage_dir / "eval_index_vectors.npy"), whitener)


def _offsets(background: np.ndarray | None, cfg: DedupConfig) -> Callable[[np.ndarray], np.ndarray] | None:
    """(m, V, D) query views -> (m, V) score-normalisation offsets, or None when score normalisation is off."""
    if background is None:
        return None
    sn = cfg.score_norm
    return lambda v: score_norm_offsets(v.reshape(-1, v.shape[-1]), background, sn.ranks, sn.beta).reshape(v.shape[:2])


def _background(pool: Described, descriptor: Descriptor, cfg: DedupConfig, seed: int) -> np.ndarray | None:
    """Score-normalisation background: a dataset, or a random sample of pool images."""
    if not cfg.score_norm.enabled:
        return None
    if cfg.score_norm.background is not None:
        images = [decode(it.data) for it in iter_images(cfg.score_norm.background)]
        bg = descriptor(images)
        return pool.whitener(bg) if pool.whitener else bg
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(len(pool.base), min(len(pool.base), cfg.score_norm.background_size), replace=False))
    return pool.base.take(rows)


@dataclass
class DedupGraph:
    table: pd.DataFrame  # per pool node: ids, component, representative, eval_match, eval_sim
    edges: Edges  # pool edges above min(threshold, eval_threshold)
    eval_edges: Edges  # pool node -> eval node edges above eval_threshold
    index: dict
    recall: dict | None = None  # approximate index: the graph's edge recall against exact search on a sample


def dedup_graph(pool: Described, ev: Described, cfg: DedupConfig, index_cfg: IndexConfig, seed: int,
                background: np.ndarray | None = None, work_dir: Path | None = None) -> DedupGraph:  # fmt: skip
    n = len(pool.meta)
    low = min(cfg.threshold, cfg.eval_threshold)
    index = build_index(pool.base, index_cfg, seed, work_dir, self_graph=True) if n else None
    chunk = BLOCK_QUERY_CHUNK if isinstance(index, BlockedIVF) else QUERY_CHUNK  # many queries per list per matmul
    queries = pool.queries(_offsets(background, cfg))
    edges = knn_edges(index, queries, cfg.k, low, view0_is_base=True, chunk=chunk) if n else Edges.empty()
    labels = components(n, edges.above(cfg.threshold))
    table = _representatives(pool.meta, labels, cfg.representative)
    cross = _eval_edges(pool, ev, index, cfg, seed, background) if n and len(ev.meta) else Edges.empty()
    _relative(table, labels, edges.above(cfg.eval_threshold), cross, ev.meta)
    approximate = index is not None and index.kind != "flat" and index_cfg.recall_sample > 0
    recall = graph_recall(pool, edges, cfg, index_cfg.recall_sample, seed, background) if approximate else None
    if index is not None:
        index.close()
    return DedupGraph(table, edges, cross, index.params if index else {}, recall)


def graph_recall(pool: Described, edges: Edges, cfg: DedupConfig, sample: int, seed: int,
                 background: np.ndarray | None) -> dict:  # fmt: skip
    """Edge recall of the pool graph on ``sample`` random nodes against brute-force search (same views, offsets,
    k and thresholds): at the threshold the graph was kept at, min(threshold, eval_threshold), and at ``threshold``.
    """
    rng = np.random.default_rng(seed + 2)
    nodes = np.sort(rng.choice(len(pool.meta), min(len(pool.meta), sample), replace=False))
    views, offsets = pool.queries(_offsets(background, cfg)).take(nodes)  # (m, V, D), (m, V)
    low = min(cfg.threshold, cfg.eval_threshold)
    exact = exact_edges(pool.base, nodes, views, cfg.k, low, offsets)
    out = {"sample": len(nodes), "k": cfg.k, "kept_threshold": low, **edge_recall(edges, exact, nodes)}
    out["at_threshold"] = edge_recall(edges.above(cfg.threshold), exact.above(cfg.threshold), nodes)
    return out


def _representatives(meta: pd.DataFrame, labels: np.ndarray, rule: str) -> pd.DataFrame:
    t = meta.assign(node=np.arange(len(meta)), label=labels)
    t["size"] = t.groupby("label")["node"].transform("size")
    if rule == "largest":
        order = t.sort_values(["label", "pixels", "row_id"], ascending=[True, False, True], kind="stable")
    else:
        order = t.sort_values(["label", "row_id"], kind="stable")
    rep = order.drop_duplicates("label").set_index("label")
    t["representative"] = t["label"].map(rep["image_id"])
    t["representative_row"] = t["label"].map(rep["row_id"]).astype(np.int64)
    t["is_representative"] = t["image_id"] == t["representative"]
    return t


def _eval_edges(pool: Described, ev: Described, index: SearchIndex, cfg: DedupConfig, seed: int,
                background: np.ndarray | None) -> Edges:  # fmt: skip
    """Pool -> eval edges (dst = eval node id) from both directions of kNN search, similarity > eval_threshold."""
    ev_index = build_index(ev.base, IndexConfig(kind="flat"), seed)
    off = _offsets(background, cfg)
    fwd = knn_edges(ev_index, pool.queries(off), cfg.k, cfg.eval_threshold, exclude_self=False)
    chunk = BLOCK_QUERY_CHUNK if isinstance(index, BlockedIVF) else QUERY_CHUNK
    back = knn_edges(index, ev.queries(off), cfg.k, cfg.eval_threshold, exclude_self=False, chunk=chunk)
    return Edges.concat([fwd, Edges(back.dst, back.src, back.sim)])


def _relative(table: pd.DataFrame, labels: np.ndarray, pool_edges: Edges, cross: Edges, ev_meta: pd.DataFrame) -> None:
    """Adds eval_match / eval_sim: the evaluation image whose component swallowed the node, or None."""
    n = len(table)
    uf = UnionFind(n + len(ev_meta))
    uf.union_edges(np.arange(n), labels)  # the self-dedup components, whole
    uf.union_edges(pool_edges.src, pool_edges.dst)
    uf.union_edges(cross.src, cross.dst + n)
    root = uf.labels()[:n]
    table["eval_match"], table["eval_sim"] = None, np.nan
    if not len(cross):
        return
    hits = pd.DataFrame({"root": root[cross.src], "eval": cross.dst, "sim": cross.sim})
    best = hits.sort_values(["root", "sim", "eval"], ascending=[True, False, True], kind="stable").drop_duplicates("root")
    best = best.set_index("root")
    touched = np.isin(root, best.index.to_numpy())
    table.loc[touched, "eval_match"] = ev_meta["eval_image"].to_numpy()[best.loc[root[touched], "eval"].to_numpy()]
    table.loc[touched, "eval_sim"] = best.loc[root[touched], "sim"].to_numpy()


def dedup(
    shards: list[Shard], eval_sets: list[EvalSetConfig], stage_dir: Path, cfg: DedupConfig, tracker: ShardTracker,
    descriptor: Descriptor | None = None, seed: int = 0, mapper: Callable[..., Iterator[Any]] | None = None,
    descriptor_key: str | None = None,
) -> StageResult:  # fmt: skip
    """Describe every pool shard (through ``mapper``, the run's Dask or Ray task runner, when given: each worker
    builds the model named by ``descriptor_key`` once), then build the graph and components here."""
    if not cfg.enabled:
        return _record(_passthrough(shards), stage_dir, "none", cfg, 0)
    built: list[Descriptor] = [descriptor] if descriptor else []

    def get() -> Descriptor:  # a fully resumed stage still needs the model for the evaluation images
        if not built:
            built.append(build_descriptor(cfg.descriptor))
        return built[0]

    if mapper is not None:
        if descriptor is not None or not descriptor_key:
            raise ValueError("describing through a task runner builds the model from the config: pass a "
                             "descriptor_key naming it, and no descriptor object")
        jobs = [(s, cfg, stage_dir / DESCRIPTORS, descriptor_key) for s in shards if not tracker.is_done(s.name)]
        for name, counts in mapper(describe_job, jobs):
            tracker.done(name, counts)
    else:
        for shard in shards:
            tracker.run(shard.name, lambda shard=shard: describe_shard(shard, get(), cfg, stage_dir / DESCRIPTORS))
    pool = load_described(stage_dir, shards, cfg, seed)
    ev = eval_described(eval_sets, get(), cfg, stage_dir, pool.whitener)
    graph = dedup_graph(pool, ev, cfg, cfg.index, seed, _background(pool, get(), cfg, seed), stage_dir)
    result = _record(graph, stage_dir, get().name, cfg, len(ev.meta))
    if cfg.descriptor.backend == "sscd" and cfg.descriptor.path is not None:
        result.extra["model_sha256"] = sha256_file(cfg.descriptor.path)
    return result


def _passthrough(shards: list[Shard]) -> DedupGraph:
    """dedup.enabled=false: every image of the shard tables is its own component; nothing is decoded."""
    cols = ["image_id", "row_id"]
    parts = [s.read_table(cols).assign(shard=s.name) for s in shards]
    meta = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*cols, "shard"])
    table = _representatives(meta.assign(pixels=0), np.arange(len(meta)), "first_row")
    table["eval_match"], table["eval_sim"] = None, np.nan
    return DedupGraph(table, Edges.empty(), Edges.empty(), {})


def _record(graph: DedupGraph, stage_dir: Path, descriptor: str, cfg: DedupConfig, n_eval: int) -> StageResult:
    table = graph.table
    ledger = LedgerParts("dedup", ledger_dir(stage_dir))
    dropped = {"near_duplicate": 0, "eval_contamination": 0}
    for r in table.itertuples(index=False):
        ids = {"row_id": int(r.row_id), "image_id": r.image_id}
        if not cfg.enabled:  # the image passes; the event keeps its lineage chain complete
            ledger.info("dedup_disabled", **ids)
            continue
        comp = {"component": r.representative, "size": int(r.size), "representative": r.representative,
                "representative_row": int(r.representative_row)}  # fmt: skip
        ledger.info("dup_component", **ids, detail={**comp, "descriptor": descriptor, "threshold": cfg.threshold})
        contaminated = {"eval_image": r.eval_match, "eval_similarity": round(float(r.eval_sim), 6),
                        "eval_threshold": cfg.eval_threshold} if r.eval_match is not None else {}  # fmt: skip
        if not r.is_representative:
            ledger.drop("near_duplicate", **ids, detail={**comp, **contaminated})
            dropped["near_duplicate"] += 1
        elif contaminated:
            ledger.drop("eval_contamination", **ids, detail={**comp, **contaminated})
            dropped["eval_contamination"] += 1
    parts = ledger.close()
    kept = table[table["is_representative"] & table["eval_match"].isna()]
    cols = ["image_id", "row_id", "shard", "representative", "size", "is_representative", "eval_match", "eval_sim"]
    with atomic_path(stage_dir / KEPT) as tmp:
        kept[["image_id", "row_id", "shard", "size"]].rename(columns={"size": "component_size"}).to_parquet(tmp, index=False)
    with atomic_path(stage_dir / COMPONENTS) as tmp:
        table[cols].rename(columns={"size": "component_size"}).to_parquet(tmp, index=False)
    ids = table["image_id"].to_numpy()
    with atomic_path(stage_dir / "edges.parquet") as tmp:
        pd.DataFrame({"src": ids[graph.edges.src], "dst": ids[graph.edges.dst], "similarity": graph.edges.sim}).to_parquet(tmp, index=False)
    multi = table.groupby("representative")["size"].first()
    return StageResult(
        counts={"input": len(table), "kept": len(kept), "dropped": dropped, "components": len(multi),
                "components_multi": int((multi > 1).sum()), "edges": len(graph.edges), "eval_edges": len(graph.eval_edges)},
        outputs=[stage_dir / KEPT, stage_dir / COMPONENTS, stage_dir / "edges.parquet", *parts],
        extra={"descriptor": descriptor, "views": cfg.descriptor.views, "flip": cfg.descriptor.flip, "k": cfg.k,
               "threshold": cfg.threshold, "eval_threshold": cfg.eval_threshold, "eval_images": n_eval,
               "representative": cfg.representative, "whitening": cfg.descriptor.whitening,
               "score_norm": cfg.score_norm.enabled, "index": graph.index, "recall": graph.recall,
               "enabled": cfg.enabled},
    )
