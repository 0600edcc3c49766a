"""Inputs: the URL list of the crawl, curated seed sets for retrieval, evaluation sets, the demo crawl."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from infra.config.base import Section

DatasetFormat = Literal["auto", "folder", "webdataset", "parquet"]
# Columns of the shard and corpus tables and keys of a corpus image's .json member: data.extra_cols may not take them.
RESERVED_COLUMNS = frozenset({"image_id", "key", "shard", "row_id", "url", "caption", "source", "list_error", "face_boxes",
                              "extra", "ext", "bytes", "sha256", "width", "height", "original_width", "original_height",
                              "phash", "seed_set", "method", "path", "list_source"})  # fmt: skip


class SeedSetConfig(Section):
    """A curated dataset used as retrieval queries (paper Table 15 rows)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path
    format: DatasetFormat = "auto"
    # sample: N nearest pool images per query; cluster: pool clusters holding > min_queries
    # queries contribute images; as_is: the set itself goes into the corpus.
    retrieval: Literal["sample", "cluster", "as_is"] = "sample"
    # Neighbours per query for sample-based retrieval; None uses retrieve.n_neighbors (paper: 4; 32 for IN-1k).
    n_neighbors: int | None = Field(default=None, ge=1)
    # Also include the seed images themselves in the corpus ("as is" row beside a "sample" row).
    include_as_is: bool = False


class EvalSetConfig(Section):
    """A benchmark: relative dedup removes pool components touching it; evaluation uses its splits."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    train: Path
    test: Path
    val: Path | None = None
    format: DatasetFormat = "auto"


class DataConfig(Section):
    # One file or a directory of files; rows are numbered in file order (row_id), never reordered.
    url_list: Path | None = None
    # auto: told by each file's name (urls.tsv.gz: TSV, decompressed). img2dataset's input_format values are accepted
    # as they are ("tsv.gz" is "tsv": compression is told by the file's first bytes). txt: one URL per line, no
    # header; json: a JSON array of rows (or of URL strings), or JSON lines; csv and tsv: a header line names columns.
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "json", "txt", "csv.gz", "tsv.gz", "jsonl.gz",
                          "json.gz", "txt.gz"] = "auto"  # fmt: skip
    url_col: str = "url"
    caption_col: str | None = "caption"
    source_col: str | None = "source"
    # Face boxes shipped with the pool (DataComp's `face_bboxes`): a column of [x0, y0, x1, y1] boxes relative to
    # the image (0-1), as a list or a JSON string. They are blurred by the faces stage besides what its detector
    # finds; a row whose boxes cannot be read is dropped (`face_boxes_malformed`) rather than kept unblurred.
    face_boxes_col: str | None = None
    # Further columns of the list kept with each image (img2dataset's save_additional_columns: LAION's LICENSE,
    # similarity, punsafe, ...): in the lineage (the row's `input` event), the ingest and corpus shard tables (JSON
    # text, `extra`), each corpus image's `.json` member and `corpus.parquet` (one column each).
    extra_cols: list[str] = Field(default_factory=list)
    seed_sets: list[SeedSetConfig] = Field(default_factory=list)
    eval_sets: list[EvalSetConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _extra_cols(self) -> DataConfig:
        named = {self.url_col, self.caption_col, self.source_col, self.face_boxes_col} - {None}
        clash = sorted({c for c in self.extra_cols if c in RESERVED_COLUMNS or c in named})
        if clash:
            raise ValueError(f"extra_cols: {clash} would overwrite a column the pipeline writes or a column named by "
                             f"url_col/caption_col/source_col/face_boxes_col (taken: {sorted(RESERVED_COLUMNS)})")  # fmt: skip
        dup = sorted({c for c in self.extra_cols if self.extra_cols.count(c) > 1})
        if dup:
            raise ValueError(f"extra_cols: {dup} given twice")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        for kind, items in (("seed_sets", self.seed_sets), ("eval_sets", self.eval_sets)):
            names = [s.name for s in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{kind}: duplicate names {dup}")
        return self


class DemoConfig(Section):
    """The bundled offline crawl, built at run time from images shipped inside Python packages."""

    enabled: bool = False
    # 0 picks a free port when the crawl is built; the port is stored with the crawl and reused.
    port: int = Field(default=0, ge=0, le=65535)
    # Sizes (MNIST has 500 images per class; splits are disjoint and class-balanced).
    eval_train_per_class: int = Field(default=100, ge=1)
    eval_test_per_class: int = Field(default=100, ge=1)
    seeds_per_class: int = Field(default=50, ge=1)
    pool_mnist: int = Field(default=2500, ge=0)
    pool_sklearn_digits: int = Field(default=400, ge=0)
    photos: int = Field(default=24, ge=0)
    faces: int = Field(default=40, ge=0)
    nonfaces: int = Field(default=40, ge=0)
    near_duplicates: int = Field(default=150, ge=0)
    eval_copies: int = Field(default=40, ge=0)
    broken: bool = True
    # The slow URL sleeps this long; keep it above ingest.timeout.
    slow_seconds: float = Field(default=4.0, gt=0)
