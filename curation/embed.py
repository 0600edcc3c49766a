"""Embedding (paper §3): a ViT backbone -> L2-normalised global embeddings, written as fp16 arrays per shard.

The core takes an :class:`Embedder` (built by the flow from the configured backbone), so any model that maps
images to a global vector plugs in. Peak memory is one batch plus one shard's embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from infra.images import decode
from infra.config.data import SeedSetConfig
from infra.datasets import iter_images
from infra.features import Embedder
from infra.shards import Shard, iter_shard_images
from infra.stage import ShardTracker, StageResult
from infra.storage import atomic_path

def _write(out_dir: Path, name: str, emb: np.ndarray, meta: pd.DataFrame) -> None:
    with atomic_path(out_dir / f"{name}.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, emb.astype(np.float16))
    with atomic_path(out_dir / f"{name}.parquet") as tmp:
        meta.to_parquet(tmp, index=False)


def embed_shard(shard: Shard, keep: set[str], embedder: Embedder, out_dir: Path) -> dict[str, int]:
    metas, images = [], []
    for meta, data in iter_shard_images(shard):
        if meta["image_id"] in keep:
            metas.append({"image_id": meta["image_id"], "row_id": int(meta["row_id"]), "shard": shard.name})
            images.append(decode(data))
    emb = embedder(images) if images else np.zeros((0, 1), np.float32)
    _write(out_dir, shard.name, emb, pd.DataFrame(metas, columns=["image_id", "row_id", "shard"]))
    return {"embedded": len(metas)}


def embed_seed_set(seed: SeedSetConfig, embedder: Embedder, out_dir: Path) -> dict[str, int]:
    metas, images = [], []
    for item in iter_images(seed.path, seed.format):
        metas.append({"image_id": item.image_id, "name": item.name, "label": item.label})
        images.append(decode(item.data))
    _write(out_dir, seed.name, embedder(images), pd.DataFrame(metas, columns=["image_id", "name", "label"]))
    return {"embedded": len(metas)}


def embed(
    shards: list[Shard], keep: set[str], seed_sets: list[SeedSetConfig], stage_dir: Path,
    make_embedder: Callable[[], Embedder], tracker: ShardTracker,
) -> StageResult:  # fmt: skip
    """Embed the kept pool images shard by shard, then each seed set; per-shard resume."""
    cache: list[Embedder] = []

    def embedder() -> Embedder:  # a fully resumed stage builds no model
        if not cache:
            cache.append(make_embedder())
        return cache[0]

    n_pool = sum(tracker.run(s.name, lambda s=s: embed_shard(s, keep, embedder(), stage_dir / "pool"))["embedded"] for s in shards)
    n_seed = {
        seed.name: tracker.run(f"seed-{seed.name}", lambda seed=seed: embed_seed_set(seed, embedder(), stage_dir / "seeds"))["embedded"]
        for seed in seed_sets
    }
    outputs = sorted((stage_dir / "pool").glob("*")) + sorted((stage_dir / "seeds").glob("*"))
    name = cache[0].name if cache else "resumed"
    return StageResult(counts={"kept": n_pool, "seeds": n_seed}, outputs=outputs, extra={"embedder": name})


def load_embeddings(paths: Iterable[Path]) -> tuple[pd.DataFrame, np.ndarray]:
    """Concatenate ``<name>.npy`` + ``<name>.parquet`` pairs (fp16 on disk -> float32)."""
    metas, embs = [], []
    for p in paths:
        metas.append(pd.read_parquet(p.with_suffix(".parquet")))
        embs.append(np.load(p, mmap_mode="r"))
    dims = {e.shape[1] for e in embs if e.shape[0]}
    dim = dims.pop() if dims else 1
    embs = [np.asarray(e, np.float32) if e.shape[0] else np.zeros((0, dim), np.float32) for e in embs]
    meta = pd.concat(metas, ignore_index=True) if metas else pd.DataFrame()
    return meta, (np.concatenate(embs) if embs else np.zeros((0, dim), np.float32))
