"""The corpus: LVD-style shards of the selected pool images (sanitized bytes) and the "as is" curated sets, a
manifest table, and a composition table in the style of paper Table 15."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from infra.config.curation import CorpusConfig
from infra.config.data import SeedSetConfig
from infra.datasets import iter_images
from infra.lineage import POOL, LedgerWriter
from infra.shards import ShardWriter, list_shards, shard_name
from infra.stage import StageResult
from infra.storage import atomic_path, atomic_write_text

MANIFEST_TABLE = "corpus.parquet"
COMPOSITION = "composition.parquet"


class _Writer:
    """Fills corpus shards of ``size`` images in order."""

    def __init__(self, shard_dir: Path, size: int):
        self.shard_dir, self.size = shard_dir, size
        self.index, self.n, self.rows = 0, 0, []
        self.w: ShardWriter | None = None

    def add(self, image_id: str, data: bytes, ext: str, **cols: object) -> str:
        if self.w is None:
            self.w = ShardWriter(self.shard_dir, shard_name(self.index))
        self.w.add(image_id, data, ext, **cols)
        name = shard_name(self.index)
        self.rows.append({"image_id": image_id, "shard": name, **cols})
        self.n += 1
        if self.n == self.size:
            self.close()
        return name

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
            self.w, self.n, self.index = None, 0, self.index + 1


def build_corpus(
    selected: pd.DataFrame, pool_shard_dir: Path, as_is: list[SeedSetConfig], stats: pd.DataFrame, stage_dir: Path,
    cfg: CorpusConfig,
) -> StageResult:  # fmt: skip
    """``selected``: image_id, row_id, shard (of the sanitized pool), seed_set, method."""
    writer = _Writer(stage_dir / "shards", cfg.shard_size)
    ledger = LedgerWriter("corpus")
    by_shard = {s.name: s for s in list_shards(pool_shard_dir)}
    info = selected.set_index("image_id")
    for shard_id in sorted(selected["shard"].unique()):
        wanted = set(selected.loc[selected["shard"] == shard_id, "image_id"])
        for key, ext, data in by_shard[shard_id]:
            if key in wanted:
                r = info.loc[key]
                name = writer.add(key, data, ext, row_id=int(r.row_id), source=POOL, seed_set=r.seed_set, method=r.method)
                ledger.keep("in_corpus", row_id=int(r.row_id), image_id=key, detail={"shard": name, "seed_set": r.seed_set})
    written = set(info.index)
    for s in as_is:
        for item in iter_images(s.path, s.format):
            if item.image_id in written:  # the same bytes are already in the corpus (pool, or another set)
                continue
            written.add(item.image_id)
            ext = item.name.rsplit(".", 1)[-1].lower()
            name = writer.add(item.image_id, item.data, ext, row_id=-1, source=s.name, seed_set=s.name, method="as_is")
            ledger.keep("in_corpus", image_id=item.image_id, source=s.name, detail={"shard": name, "as_is": True})
    writer.close()
    ledger.write(stage_dir / "ledger" / "corpus.parquet")
    table = pd.DataFrame(writer.rows)
    with atomic_path(stage_dir / MANIFEST_TABLE) as tmp:
        table.to_parquet(tmp, index=False)
    comp = composition(table, stats)
    with atomic_path(stage_dir / COMPOSITION) as tmp:
        comp.to_parquet(tmp, index=False)
    atomic_write_text(stage_dir / "composition.md", markdown_table(comp))
    outputs = [p for s in list_shards(stage_dir / "shards") for p in (s.tar, s.table)]
    outputs += [stage_dir / MANIFEST_TABLE, stage_dir / COMPOSITION, stage_dir / "ledger" / "corpus.parquet"]
    return StageResult(
        counts={"kept": len(table), "shards": writer.index, "by_source": table.groupby("seed_set").size().to_dict()},
        outputs=outputs,
        extra={"composition": comp.to_dict(orient="records")},
    )


def composition(table: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 15 style: dataset, images (queries), retrieval (method, k), retrieved, final (in the corpus).

    ``retrieved`` counts distinct pool images the set retrieved; ``final`` counts corpus images attributed to it
    (an image retrieved by several sets is attributed to its most similar query's set).
    """
    final = table.groupby(["seed_set", "method"]).size().rename("final").reset_index()
    cols = ["seed_set", "method", "queries", "retrieved", "n_neighbors"]
    stats = stats.reindex(columns=cols) if not stats.empty else pd.DataFrame(columns=cols)
    out = stats.merge(final, on=["seed_set", "method"], how="outer")
    as_is = out["method"] == "as_is"
    out.loc[as_is, "queries"] = out.loc[as_is, "final"]  # an "as is" row lists the set's own size
    out["final"] = out["final"].fillna(0).astype(int)

    def label(r: pd.Series) -> str:
        if r["method"] == "sample" and pd.notna(r["n_neighbors"]):
            return f"sample (k={int(r['n_neighbors'])})"
        return {"as_is": "as is"}.get(r["method"], r["method"])

    out["retrieval"] = out.apply(label, axis=1) if len(out) else pd.Series(dtype=str)
    out.loc[as_is, "retrieved"] = None
    out = out.rename(columns={"seed_set": "dataset", "queries": "images"})
    total = pd.DataFrame([{"dataset": "total", "retrieval": "", "final": int(out["final"].sum())}])
    return pd.concat([out[["dataset", "images", "retrieval", "retrieved", "final"]], total], ignore_index=True)


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return "–"
        if isinstance(v, int | float | np.integer | np.floating) and float(v).is_integer():
            return f"{int(v):,}"
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
