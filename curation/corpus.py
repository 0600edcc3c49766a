"""The corpus: LVD-style shards of the selected pool images (sanitized bytes) and the "as is" curated sets, a
manifest table, and a composition table in the style of paper Table 15."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from curation.imageguard import is_plain
from infra.config.curation import CorpusConfig
from infra.config.data import SeedSetConfig
from infra.datasets import LabeledImage, decode_item, iter_images
from infra.images import encode as encode_image
from infra.lineage import POOL, LedgerParts, ledger_dir
from infra.shards import ShardWriter, list_shards, shard_name
from infra.stage import StageResult
from infra.storage import atomic_path, atomic_write_text, sha256_bytes

MANIFEST_TABLE = "corpus.parquet"
COMPOSITION = "composition.parquet"


class _Writer:
    """Fills corpus shards of ``size`` images in order."""

    def __init__(self, shard_dir: Path, size: int):
        self.shard_dir, self.size = shard_dir, size
        self.index, self.n, self.rows = 0, 0, []
        self.w: ShardWriter | None = None

    def add(self, image_id: str, data: bytes, ext: str, extra: str | None = None, **cols: object) -> str:
        """``extra``: the list's ``data.extra_cols`` as JSON text: top-level keys of the image's ``.json`` member (as
        img2dataset's save_additional_columns), one column each in ``corpus.parquet``, the text in the shard table."""
        if self.w is None:
            self.w = ShardWriter(self.shard_dir, shard_name(self.index))
        more = json.loads(extra) if extra else {}
        meta = {"image_id": image_id, **cols, **more, "sha256": sha256_bytes(data)}
        self.w.add(image_id, data, ext, meta={k: v for k, v in meta.items() if v is not None}, **cols, extra=extra)
        name = shard_name(self.index)
        self.rows.append({"image_id": image_id, "shard": name, **cols, **more})
        self.n += 1
        if self.n == self.size:
            self.close()
        return name

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
            self.w, self.n, self.index = None, 0, self.index + 1


# Per corpus image, from the pool's shard tables (ingest's for what it alone records): what img2dataset and
# WebDataset users expect beside each image, in the shard's `.json` member and in the corpus tables.
POOL_COLUMNS = ("row_id", "url", "caption", "source", "width", "height", "original_width", "original_height", "extra")


def _pool_rows(pool_shard: Path, ingest_shard_dir: Path | None, ids: set[str]) -> pd.DataFrame:
    """POOL_COLUMNS of the wanted images of one shard (the sanitized pool's table, joined with ingest's by id)."""
    table = pd.read_parquet(pool_shard)
    table = table[table["image_id"].isin(ids)]
    ingest_table = None if ingest_shard_dir is None else ingest_shard_dir / pool_shard.name
    if ingest_table is not None and ingest_table.is_file():
        have = set(pq.read_schema(ingest_table).names)
        extra = [c for c in POOL_COLUMNS if c not in table.columns and c in have]
        more = pd.read_parquet(ingest_table, columns=["image_id", *extra]) if extra else None
        if more is not None:
            table = table.merge(more.drop_duplicates("image_id"), on="image_id", how="left")
    return table.reindex(columns=["image_id", *POOL_COLUMNS]).set_index("image_id")


def _value(v: object) -> object:
    """A JSON/parquet-friendly scalar: NaN and pandas' NA become None, numpy numbers Python ones."""
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return None
    return v.item() if isinstance(v, np.generic) else v


def _parquet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Columns of mixed Python types (a list's extra column with numbers in some rows and text in others) as text,
    so the table can be written; others as they are."""
    for c in table.select_dtypes(include="object").columns:
        values = [_value(v) for v in table[c]]  # missing values (None, NaN, NA) as None
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            table[c] = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
    return table


def build_corpus(
    selected: pd.DataFrame, pool_shard_dir: Path, as_is: list[SeedSetConfig], stats: pd.DataFrame, stage_dir: Path,
    cfg: CorpusConfig, ingest_shard_dir: Path | None = None, encode: tuple[str, int] = ("jpg", 95),
) -> StageResult:  # fmt: skip
    """``selected``: image_id, row_id, shard (of the sanitized pool), seed_set, method. Each corpus image gets a
    ``<image_id>.json`` member (image id, row, URL, caption, source, the list's source, sizes, seed set, method,
    sha256). Images of a set added as it is keep their bytes where every decoder reads them alike (8-bit RGB or grey
    JPEG and PNG without EXIF rotation, alpha or frames: what ingest hands OpenCV as it is); any other (HEIC, TIFF,
    16-bit, rotated, transparent) is decoded as every reader decodes it (`infra.images`) and stored in the pool's
    ``encode`` (format, quality) at its own size, the ledger saying what it was converted from."""
    writer = _Writer(stage_dir / "shards", cfg.shard_size)
    ledger = LedgerParts("corpus", ledger_dir(stage_dir))
    by_shard = {s.name: s for s in list_shards(pool_shard_dir)}
    info = selected.set_index("image_id")
    for shard_id in sorted(selected["shard"].unique()):
        wanted = set(selected.loc[selected["shard"] == shard_id, "image_id"])
        pool = _pool_rows(by_shard[shard_id].table, ingest_shard_dir, wanted)
        for key, ext, data in by_shard[shard_id]:
            if key in wanted:
                r = info.loc[key]
                cols = {c: _value(pool.at[key, c]) for c in POOL_COLUMNS if c not in ("row_id", "source")}
                # `source` says where the image came from (the pool, or a seed set added as it is); `list_source`
                # is the URL list's own source column (for `lvd folder-urls`: the top-level sub-folder).
                cols |= {"row_id": int(r.row_id), "source": POOL, "list_source": _value(pool.at[key, "source"]),
                         "seed_set": r.seed_set, "method": r.method}  # fmt: skip
                name = writer.add(key, data, ext, **cols)
                ledger.keep("in_corpus", row_id=int(r.row_id), image_id=key,
                            detail={"shard": name, "seed_set": r.seed_set, "sha256": sha256_bytes(data)})  # fmt: skip
    written = set(info.index)
    for s in as_is:
        for item in iter_images(s.path, s.format):
            if item.image_id in written:  # the same bytes are already in the corpus (pool, or another set)
                continue
            written.add(item.image_id)
            data, ext, converted = _portable(item, s.name, encode)
            width, height = _size(data)
            name = writer.add(item.image_id, data, ext, row_id=-1, url=None, caption=None, source=s.name,
                              list_source=None, width=width, height=height, original_width=width, original_height=height,
                              seed_set=s.name, method="as_is", path=item.name)  # fmt: skip
            detail = {"shard": name, "as_is": True, "sha256": sha256_bytes(data)}
            ledger.keep("in_corpus", image_id=item.image_id, source=s.name,
                        detail=detail | ({"converted_from": converted} if converted else {}))
    writer.close()
    parts = ledger.close()
    table = _parquet_safe(pd.DataFrame(writer.rows))
    with atomic_path(stage_dir / MANIFEST_TABLE) as tmp:
        table.to_parquet(tmp, index=False)
    comp = composition(table, stats)
    with atomic_path(stage_dir / COMPOSITION) as tmp:
        comp.to_parquet(tmp, index=False)
    atomic_write_text(stage_dir / "composition.md", markdown_table(comp))
    outputs = [p for s in list_shards(stage_dir / "shards") for p in (s.tar, s.table)]
    outputs += [stage_dir / MANIFEST_TABLE, stage_dir / COMPOSITION, *parts]
    return StageResult(
        counts={"kept": len(table), "shards": writer.index, "by_source": table.groupby("seed_set").size().to_dict(),
                "from_pool": int((table["source"] == POOL).sum()) if len(table) else 0,
                "as_is": table[table["method"] == "as_is"].groupby("seed_set").size().to_dict() if len(table) else {}},
        outputs=outputs,
        extra={"composition": comp.to_dict(orient="records")},
    )


def _portable(item: LabeledImage, set_name: str, encode: tuple[str, int]) -> tuple[bytes, str, str | None]:
    """(bytes, extension, the format they were converted from or None) of a set's image for the corpus."""
    ext = item.ext or "jpg"  # (a tar's member `val/n01/a.jpg` is named `val.tar:val/n01/a`: not from the name)
    try:
        with Image.open(io.BytesIO(item.data)) as img:
            if is_plain(img, item.data):
                return item.data, ext, None
    except (OSError, ValueError, Image.DecompressionBombError):
        pass  # decode_item names the file
    fmt, quality = encode
    img = decode_item(item, f"data.seed_sets[{set_name}]", mode=None)  # grey stays grey
    return encode_image(img, fmt, quality), fmt, ext


def _size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height from the image header (no decode); None where it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, None


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
        return {"as_is": "as is", "pool": "whole pool (no seed sets)"}.get(r["method"], r["method"])

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
