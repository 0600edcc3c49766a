"""Copy-detection dedup (paper §A.3).

1. Self-dedup: descriptors of every pool image -> kNN graph (k=64) -> edges with cosine > 0.6 -> connected
   components (union-find) -> one representative per component: the member seen first in the crawl (smallest
   row_id). The others are dropped as ``near_duplicate`` with their component and representative recorded.
2. Relative dedup: the same procedure over the representatives plus every image of the evaluation sets'
   splits, at cosine > 0.45; every component that contains an evaluation image is dropped whole
   (``eval_contamination``, with the evaluation image that caused it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from curation.graph import UnionFind, knn_edges
from infra.images import decode
from infra.config.curation import DedupConfig, DescriptorConfig
from infra.config.data import EvalSetConfig
from infra.datasets import iter_images
from infra.lineage import LedgerWriter
from infra.shards import Shard, iter_shard_images
from infra.stage import ShardTracker, StageResult
from infra.storage import atomic_path

DESCRIPTORS = "descriptors"
KEPT = "kept.parquet"


class Descriptor(Protocol):
    name: str

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """(N, D) float32, L2-normalised."""
        ...


class PixelDescriptor:
    """Training-free baseline: grey, resized, mean-centred pixels. Weak under crops; calibrate its threshold."""

    def __init__(self, cfg: DescriptorConfig):
        self.size = cfg.image_size
        self.name = f"pixel{self.size}"

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        arr = np.stack(
            [np.asarray(im.convert("L").resize((self.size, self.size), Image.BILINEAR), np.float32).ravel() for im in images]
        )
        arr -= arr.mean(1, keepdims=True)
        return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-6)


def build_descriptor(cfg: DescriptorConfig) -> Descriptor:
    if cfg.backend == "pixel":
        return PixelDescriptor(cfg)
    raise ValueError(f"descriptor backend {cfg.backend!r} is not available")


def describe(images: list[Image.Image], descriptor: Descriptor, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of the images and of their mirror images (for flip-invariant search)."""
    plain, flipped = [], []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        plain.append(descriptor(chunk))
        flipped.append(descriptor([ImageOps.mirror(im) for im in chunk]))
    return np.concatenate(plain), np.concatenate(flipped)


def describe_shard(shard: Shard, descriptor: Descriptor, cfg: DedupConfig, out_dir: Path) -> dict[str, int]:
    metas, images = [], []
    for meta, data in iter_shard_images(shard):
        metas.append({"image_id": meta["image_id"], "row_id": int(meta["row_id"]), "shard": shard.name})
        images.append(decode(data))
    d, f = describe(images, descriptor, cfg.descriptor.batch_size) if images else (np.zeros((0, 1)), np.zeros((0, 1)))
    for suffix, arr in (("", d), ("_flip", f)):
        with atomic_path(out_dir / f"{shard.name}{suffix}.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr.astype(np.float16))
    with atomic_path(out_dir / f"{shard.name}.parquet") as tmp:
        pd.DataFrame(metas, columns=["image_id", "row_id", "shard"]).to_parquet(tmp, index=False)
    return {"images": len(metas)}


@dataclass
class Components:
    labels: np.ndarray  # component label per node (smallest member index)
    sizes: np.ndarray  # size of each node's component


def components(n: int, src: np.ndarray, dst: np.ndarray) -> Components:
    uf = UnionFind(n)
    uf.union_edges(src, dst)
    labels = uf.labels()
    counts = np.bincount(labels, minlength=n)
    return Components(labels, counts[labels])


def load_descriptors(out_dir: Path, shards: list[Shard]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    metas = [pd.read_parquet(out_dir / f"{s.name}.parquet") for s in shards]
    desc = [np.load(out_dir / f"{s.name}.npy").astype(np.float32) for s in shards]
    flip = [np.load(out_dir / f"{s.name}_flip.npy").astype(np.float32) for s in shards]
    dim = next((d.shape[1] for d in desc if d.shape[0]), 1)
    fix = [d if d.shape[0] else np.zeros((0, dim), np.float32) for d in desc]
    fix_f = [d if d.shape[0] else np.zeros((0, dim), np.float32) for d in flip]
    return pd.concat(metas, ignore_index=True), np.concatenate(fix), np.concatenate(fix_f)


def eval_descriptors(eval_sets: list[EvalSetConfig], descriptor: Descriptor, batch: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Descriptors of every image of every split (train, test, val) of every evaluation set."""
    metas, images = [], []
    for ev in eval_sets:
        for split, path in (("train", ev.train), ("test", ev.test), ("val", ev.val)):
            if path is None:
                continue
            for item in iter_images(path, ev.format):
                metas.append({"eval_set": ev.name, "split": split, "eval_image": item.name, "eval_image_id": item.image_id})
                images.append(decode(item.data))
    if not images:
        return pd.DataFrame(columns=["eval_set", "split", "eval_image", "eval_image_id"]), np.zeros((0, 1), np.float32)
    d, _ = describe(images, descriptor, batch)
    return pd.DataFrame(metas), d


def self_dedup(meta: pd.DataFrame, desc: np.ndarray, flip: np.ndarray, cfg: DedupConfig) -> pd.DataFrame:
    """Adds columns component, component_size, representative (image id), is_representative."""
    order = np.lexsort((meta["row_id"].to_numpy(),))  # nodes in crawl order: label = first-seen member
    meta, desc, flip = meta.iloc[order].reset_index(drop=True), desc[order], flip[order]
    src, dst, _ = knn_edges(desc, desc, cfg.k + 1, cfg.threshold, flip_queries=flip)
    comp = components(len(meta), src, dst)
    out = meta.assign(component=comp.labels, component_size=comp.sizes)
    out["representative"] = out["image_id"].to_numpy()[comp.labels]
    out["is_representative"] = np.arange(len(out)) == comp.labels
    return out, desc, flip


def relative_dedup(
    reps: pd.DataFrame, rep_desc: np.ndarray, rep_flip: np.ndarray, ev_meta: pd.DataFrame, ev_desc: np.ndarray,
    cfg: DedupConfig,
) -> pd.Series:  # fmt: skip
    """For each representative: the eval image (as "set/split/name") its component touches, or None."""
    n = len(reps)
    if ev_desc.shape[0] == 0 or n == 0:
        return pd.Series([None] * n, index=reps.index, dtype=object)
    nodes = np.concatenate([rep_desc, ev_desc])
    flips = np.concatenate([rep_flip, ev_desc])
    src, dst, _ = knn_edges(nodes, nodes, cfg.k + 1, cfg.eval_threshold, flip_queries=flips)
    comp = components(len(nodes), src, dst)
    culprit: dict[int, str] = {}
    for j in range(n, len(nodes)):
        e = ev_meta.iloc[j - n]
        culprit.setdefault(int(comp.labels[j]), f"{e.eval_set}/{e.split}/{e.eval_image}")
    return pd.Series([culprit.get(int(comp.labels[i])) for i in range(n)], index=reps.index, dtype=object)


def dedup(
    shards: list[Shard], eval_sets: list[EvalSetConfig], stage_dir: Path, cfg: DedupConfig, tracker: ShardTracker,
    descriptor: Descriptor | None = None,
) -> StageResult:  # fmt: skip
    desc_dir = stage_dir / DESCRIPTORS
    built: list[Descriptor] = [descriptor] if descriptor else []

    def work(shard: Shard) -> dict[str, int]:
        if not built:
            built.append(build_descriptor(cfg.descriptor))
        return describe_shard(shard, built[0], cfg, desc_dir)

    for shard in shards:
        tracker.run(shard.name, lambda shard=shard: work(shard))
    meta, desc, flip = load_descriptors(desc_dir, shards)
    if not built:
        built.append(build_descriptor(cfg.descriptor))
    table, desc, flip = self_dedup(meta, desc, flip, cfg)
    reps = table["is_representative"].to_numpy()
    ev_meta, ev_desc = eval_descriptors(eval_sets, built[0], cfg.descriptor.batch_size)
    contaminated = relative_dedup(table[reps], desc[reps], flip[reps], ev_meta, ev_desc, cfg)
    table["eval_match"] = None
    table.loc[contaminated.index, "eval_match"] = contaminated
    by_rep = table[reps].set_index("image_id")["eval_match"]
    table["eval_match"] = table["representative"].map(by_rep)
    return _record(table, stage_dir, built[0].name, cfg, len(ev_meta))


def _record(table: pd.DataFrame, stage_dir: Path, descriptor: str, cfg: DedupConfig, n_eval: int) -> StageResult:
    ledger = LedgerWriter("dedup")
    dropped = {"near_duplicate": 0, "eval_contamination": 0}
    for r in table.itertuples(index=False):
        ids = {"row_id": int(r.row_id), "image_id": r.image_id}
        comp = {"component": r.representative[:16], "size": int(r.component_size), "representative": r.representative}
        ledger.info("dup_component", **ids, detail={**comp, "descriptor": descriptor, "threshold": cfg.threshold})
        if not r.is_representative:
            ledger.drop("near_duplicate", **ids, detail=comp)
            dropped["near_duplicate"] += 1
        elif r.eval_match is not None:
            ledger.drop("eval_contamination", **ids, detail={**comp, "eval_image": r.eval_match, "threshold": cfg.eval_threshold})
            dropped["eval_contamination"] += 1
    ledger.write(stage_dir / "ledger" / "dedup.parquet")
    kept = table[table["is_representative"] & table["eval_match"].isna()]
    with atomic_path(stage_dir / KEPT) as tmp:
        kept[["image_id", "row_id", "shard", "component", "component_size"]].to_parquet(tmp, index=False)
    with atomic_path(stage_dir / "components.parquet") as tmp:
        table.drop(columns=["is_representative"]).to_parquet(tmp, index=False)
    sizes = table.groupby("component").size()
    return StageResult(
        counts={"input": len(table), "kept": len(kept), "dropped": dropped, "components": int(len(sizes)),
                "components_multi": int((sizes > 1).sum())},  # fmt: skip
        outputs=[stage_dir / KEPT, stage_dir / "components.parquet", stage_dir / "ledger" / "dedup.parquet"],
        extra={"descriptor": descriptor, "k": cfg.k, "threshold": cfg.threshold, "eval_threshold": cfg.eval_threshold,
               "eval_images": n_eval},  # fmt: skip
    )
