"""Embedding (paper §3): a backbone -> L2-normalised global embeddings, written as memory-mapped fp16 shards.

Per shard: images are decoded and preprocessed in parallel one batch at a time, the model runs under bf16
autocast (CPU or GPU), and the shard's embeddings are written as a memory-mapped fp16 ``.npy``, renamed into
place when complete; then the shard is marked done, so a rerun resumes at the first unmarked shard. Peak memory
is the model, one batch of decoded images and one shard's encoded bytes and fp16 embeddings, whatever the pool
size. Images that fail to decode are dropped with ``decode_error`` in the ledger.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from curation.vectors import VectorStore, VectorWriter
from infra.config.data import SeedSetConfig
from infra.datasets import DatasetError, iter_images
from infra.features import Embedder
from infra.images import decode
from infra.lineage import LedgerWriter
from infra.precision import resolve
from infra.shards import Shard, iter_shard_images
from infra.stage import ShardTracker, StageResult
from infra.storage import atomic_path
from infra.workers import claim_worker_gpu, process_cached

POOL, SEEDS = "pool", "seeds"


@dataclass
class Runner:
    """Batched, autocast inference of an :class:`Embedder`'s model with threaded decode + preprocess."""

    embedder: Embedder
    device: torch.device
    threads: int = 2

    def __post_init__(self) -> None:
        self.model = self.embedder.model.to(self.device).eval()
        self.pool = ThreadPoolExecutor(self.threads)

    def _prepare(self, data: bytes) -> torch.Tensor | None:
        try:
            return self.embedder.preprocess(decode(data))
        except Exception:
            return None

    @torch.inference_mode()
    def encode(self, batch: list[torch.Tensor]) -> np.ndarray:
        x = torch.stack(batch).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=resolve(self.embedder.precision, self.device.type) == "bf16"):
            z = self.model(x)
        return F.normalize(z.float(), dim=-1).cpu().numpy()

    def run(self, items: Iterable[tuple[dict, bytes]]) -> Iterator[tuple[list[int], np.ndarray]]:
        """(positions that decoded, embeddings) per batch, in order; ``items`` are taken a batch at a time (a seed set
        is read as it is embedded, not held)."""
        bs = self.embedder.batch_size
        stream, s = iter(items), 0
        while batch := list(itertools.islice(stream, bs)):
            tensors = list(self.pool.map(self._prepare, [d for _, d in batch]))
            ok = [s + i for i, t in enumerate(tensors) if t is not None]
            s += len(batch)
            if ok:
                yield ok, self.encode([t for t in tensors if t is not None])
            else:
                yield ok, np.zeros((0, 0), np.float32)


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _embed_items(items: Iterable[tuple[dict, bytes]], runner: Runner, path: Path, dim: int) -> tuple[list[int], int]:
    """Stream embeddings of ``items`` into ``path``; returns (positions kept, dim)."""
    writer: VectorWriter | None = None
    kept: list[int] = []
    pending: list[np.ndarray] = []
    for ok, emb in runner.run(items):
        kept += ok
        if len(ok):
            dim = emb.shape[1]
            pending.append(emb.astype(np.float16))
    writer = VectorWriter(path, len(kept), dim)  # the row count is known once every image was decoded
    for emb in pending:
        writer.add(emb)
    writer.close()
    return kept, dim


def embed_shard(shard: Shard, keep: set[str], runner: Runner, out_dir: Path, ledger_dir: Path) -> dict[str, int]:
    items = [(m, d) for m, d in iter_shard_images(shard) if m["image_id"] in keep]
    kept, _ = _embed_items(items, runner, out_dir / f"{shard.name}.npy", 1)
    metas = [{"image_id": items[i][0]["image_id"], "row_id": int(items[i][0]["row_id"]), "shard": shard.name} for i in kept]
    ledger = LedgerWriter("embed")
    for i in sorted(set(range(len(items))) - set(kept)):
        ledger.drop("decode_error", row_id=int(items[i][0]["row_id"]), image_id=items[i][0]["image_id"])
    ledger.write(ledger_dir / f"{shard.name}.parquet")
    with atomic_path(out_dir / f"{shard.name}.parquet") as tmp:
        pd.DataFrame(metas, columns=["image_id", "row_id", "shard"]).to_parquet(tmp, index=False)
    return {"embedded": len(kept), "drop:decode_error": len(items) - len(kept)}


def embed_seed_set(seed: SeedSetConfig, runner: Runner, out_dir: Path) -> dict[str, int]:
    metas: list[dict] = []

    def items() -> Iterator[tuple[dict, bytes]]:  # read as embedded: memory holds a batch of the set, not the set
        for item in iter_images(seed.path, seed.format):
            metas.append({"image_id": item.image_id, "name": item.name, "label": item.label})
            yield metas[-1], item.data

    kept, _ = _embed_items(items(), runner, out_dir / f"{seed.name}.npy", 1)
    if len(kept) < len(metas):  # refused at start-up (flows.preflight); changed since: said, not dropped silently
        bad = [metas[i]["name"] for i in sorted(set(range(len(metas))) - set(kept))]
        raise DatasetError(f"data.seed_sets[{seed.name}].path ({seed.path}): {len(bad)} images cannot be decoded "
                           f"({', '.join(bad[:5])}); remove or replace them")
    metas = [metas[i] for i in kept]
    with atomic_path(out_dir / f"{seed.name}.parquet") as tmp:
        pd.DataFrame(metas, columns=["image_id", "name", "label"]).to_parquet(tmp, index=False)
    return {"embedded": len(kept)}


@dataclass(frozen=True)
class EmbedJob:
    """One pool shard to embed in whatever process runs it (a Dask worker): everything it needs is picklable, and
    the model is built once per process (``embedder_key`` names it)."""

    shard: Shard
    keep: frozenset[str]  # the kept image ids of this shard
    stage_dir: Path
    make_embedder: Callable[[], Embedder]  # module-level function or functools.partial of one
    embedder_key: str
    device: str
    threads: int

    @property
    def name(self) -> str:
        return self.shard.name


def embed_job(job: EmbedJob) -> tuple[str, dict[str, int]]:
    def build() -> Runner:
        claim_worker_gpu()  # device "cuda" (or "auto" on a GPU host) is then this worker's own GPU
        return Runner(job.make_embedder(), pick_device(job.device), job.threads)

    runner = process_cached(f"embed:{job.embedder_key}:{job.device}:{job.threads}", build)
    return job.name, embed_shard(job.shard, set(job.keep), runner, job.stage_dir / POOL, job.stage_dir / "ledger")


def embed(
    shards: list[Shard], keep: set[str], seed_sets: list[SeedSetConfig], stage_dir: Path,
    make_embedder: Callable[[], Embedder], tracker: ShardTracker, device: str = "auto", threads: int = 2,
    mapper: Callable[..., Iterator[Any]] | None = None, embedder_key: str | None = None,
) -> StageResult:  # fmt: skip
    """Embed the kept pool images shard by shard, then each seed set; per-shard resume. With a ``mapper`` (the run's
    Dask or Ray task runner) the pool shards run as tasks in the workers, each building the model once per
    ``embedder_key`` (which must identify the model: weights and settings); seed sets (small) stay here."""
    cache: list[Runner] = []

    def runner() -> Runner:  # a fully resumed stage builds no model
        if not cache:
            cache.append(Runner(make_embedder(), pick_device(device), threads))
        return cache[0]

    if mapper is not None:
        if not embedder_key:
            raise ValueError("embedding through a task runner needs an embedder_key naming the model")
        jobs = [(EmbedJob(s, frozenset(keep & set(s.read_table(["image_id"])["image_id"])), stage_dir, make_embedder,
                          embedder_key, device, threads),)
                for s in shards if not tracker.is_done(s.name)]  # fmt: skip
        for name, counts in mapper(embed_job, jobs):
            tracker.done(name, counts)
    totals = {"embedded": 0, "decode_error": 0}
    for s in shards:
        c = tracker.info(s.name) if mapper is not None else \
            tracker.run(s.name, lambda s=s: embed_shard(s, keep, runner(), stage_dir / POOL, stage_dir / "ledger"))
        totals["embedded"] += c["embedded"]
        totals["decode_error"] += c.get("drop:decode_error", 0)
    n_seed = {
        seed.name: tracker.run(f"seed-{seed.name}", lambda seed=seed: embed_seed_set(seed, runner(), stage_dir / SEEDS))["embedded"]
        for seed in seed_sets
    }
    outputs = sorted((stage_dir / POOL).glob("*")) + sorted((stage_dir / SEEDS).glob("*")) + sorted((stage_dir / "ledger").glob("*"))
    store = pool_store(stage_dir)
    return StageResult(
        counts={"kept": totals["embedded"], "dropped": {"decode_error": totals["decode_error"]}, "seeds": n_seed},
        outputs=outputs,
        extra={"embedder": cache[0].embedder.name if cache else "resumed", "dim": store[1].dim,
               "device": str(cache[0].device) if cache else None, "shards_on": "task runner" if mapper else "flow"},
    )


def pool_store(stage_dir: Path) -> tuple[pd.DataFrame, VectorStore]:
    """Metadata and memory-mapped embeddings of the pool, in shard order."""
    paths = sorted((stage_dir / POOL).glob("*.npy"))
    meta = pd.concat([pd.read_parquet(p.with_suffix(".parquet")) for p in paths], ignore_index=True) if paths else pd.DataFrame(columns=["image_id", "row_id", "shard"])
    return meta, VectorStore(paths)


def seed_store(stage_dir: Path, name: str) -> tuple[pd.DataFrame, VectorStore]:
    path = stage_dir / SEEDS / f"{name}.npy"
    return pd.read_parquet(path.with_suffix(".parquet")), VectorStore([path])
