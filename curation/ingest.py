"""Ingest: URL list -> guard -> img2dataset download (per shard) -> canonical image shards + ledger.

img2dataset does the fetching, decoding, resizing and re-encoding; this stage drives its ``Downloader`` one
shard at a time in-process (no process pool per call, so shards fan out through the flow's task runner),
then reconciles its per-sample output against the shard's input rows: every row ends in exactly one of
``downloaded`` (an ``info`` event with the image id) or a ``drop`` with a reason. Exact duplicates (same
sha256 of the downloaded bytes) are dropped in favour of the first row.
"""

from __future__ import annotations

import io
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.urls import UrlGuard, first_occurrence, iter_shards
from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig
from infra.lineage import LedgerWriter
from infra.shards import ShardWriter, iter_tar, list_shards, shard_name
from infra.stage import ShardTracker, StageResult, add_counts, summarize
from infra.storage import atomic_path

EXACT_DUPS = "exact_duplicates.parquet"


def download_reason(status: str, message: str | None) -> str:
    """A stable reason code for img2dataset's per-sample status and error message."""
    m = (message or "").lower()
    if status == "failed_to_download":
        if code := re.search(r"http error (\d{3})", m):
            return f"http_{code.group(1)}"
        for needle, reason in (
            ("x-robots-tag", "robots_disallowed"),
            ("timed out", "timeout"),
            ("timeout", "timeout"),
            ("hash mismatch", "hash_mismatch"),
            ("redirect", "redirect_error"),
            ("name or service not known", "dns_error"),
            ("nodename nor servname", "dns_error"),
            ("connection reset", "connection_error"),
            ("connection refused", "connection_error"),
            ("remote end closed", "connection_error"),
        ):
            if needle in m:
                return reason
        return "download_error"
    for needle, reason in (
        ("too many pixels to decode", "decompression_bomb"),
        ("too small", "image_too_small"),
        ("area too large", "image_too_large"),
        ("aspect ratio", "aspect_ratio_too_large"),
    ):
        if needle in m:
            return reason
    return "decode_error"


def _guarded_resizer(cfg: IngestConfig) -> Any:
    """img2dataset's Resizer behind a header check: images with too many pixels are refused before decoding."""
    from img2dataset.resizer import Resizer

    class GuardedResizer(Resizer):  # type: ignore[misc]
        def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
            try:
                with Image.open(img_stream) as im:  # reads the header only
                    w, h = im.size
            except Image.DecompressionBombError as err:
                return None, None, None, None, None, f"too many pixels to decode ({err})"
            except Exception:  # noqa: BLE001 - not readable by PIL: the resizer's decoder decides
                w = h = 0
            if w * h > cfg.max_decode_pixels:
                return None, None, None, None, None, f"too many pixels to decode ({w}x{h})"
            img_stream.seek(0)
            return super().__call__(img_stream, blurring_bbox_list)

    return GuardedResizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_quality=cfg.encode_quality,
        encode_format=cfg.encode_format,
        min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area,
        max_aspect_ratio=cfg.max_aspect_ratio,
    )


COLUMNS = ["row_id", "source", "caption", "url"]


def run_img2dataset(rows: pd.DataFrame, work: Path, cfg: IngestConfig) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """Download ``rows`` with img2dataset into ``work``; return its per-sample table and images by key."""
    from img2dataset.downloader import Downloader
    from img2dataset.writer import WebDatasetSampleWriter

    work.mkdir(parents=True, exist_ok=True)
    arrow_path = work / "input.arrow"
    table = pa.Table.from_pandas(rows[COLUMNS].reset_index(drop=True), preserve_index=False)
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=_guarded_resizer(cfg),
        thread_count=cfg.threads,
        save_caption=True,
        extract_exif=False,
        output_folder=str(work / "out"),
        column_list=COLUMNS,
        timeout=cfg.timeout,
        number_sample_per_shard=max(len(rows), 1),
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=cfg.encode_format,
        retries=cfg.retries,
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=cfg.disallowed_header_directives or None,
    )
    (work / "out").mkdir(exist_ok=True)
    ok, _ = downloader((0, str(arrow_path)))
    if not ok:
        raise RuntimeError(f"img2dataset failed on shard input {arrow_path} (see the traceback above)")
    meta = pq.read_table(work / "out" / "00000.parquet").to_pandas()
    images = {key: data for key, ext, data in iter_tar(work / "out" / "00000.tar") if ext == cfg.encode_format}
    return meta, images


@dataclass
class IngestShard:
    index: int
    rows: pd.DataFrame


def ingest_shard(
    shard: IngestShard, stage_dir: Path, cfg: IngestConfig, guard: UrlGuard, dup_of: dict[int, int]
) -> dict[str, int]:
    """Guard, download and record one shard; returns its counts. Writes shard, ledger; the caller marks done."""
    name = shard_name(shard.index)
    ledger = LedgerWriter("ingest")
    fetch = []
    for r in shard.rows.itertuples(index=False):
        row_id = int(r.row_id)
        ledger.info("input", row_id=row_id, url=r.url, detail={"source": r.source, "caption": r.caption})
        if row_id in dup_of:
            ledger.drop("url_duplicate", row_id=row_id, detail={"duplicate_of_row": dup_of[row_id]})
        elif reason := guard.check(r.url):
            ledger.drop(reason, row_id=row_id)
        else:
            fetch.append(r)
    work = stage_dir / "work" / name
    shutil.rmtree(work, ignore_errors=True)
    meta, images = (
        run_img2dataset(pd.DataFrame(fetch, columns=shard.rows.columns), work, cfg)
        if fetch
        else (pd.DataFrame(columns=["row_id", "status", "error_message", "key"]), {})
    )
    seen: dict[str, int] = {}
    with ShardWriter(stage_dir / "shards", name) as writer:
        by_row = {int(m.row_id): m for m in meta.itertuples(index=False)}
        for r in sorted(fetch, key=lambda r: int(r.row_id)):
            row_id = int(r.row_id)
            m = by_row.get(row_id)
            if m is None:
                ledger.drop("lost_by_downloader", row_id=row_id, detail={"note": "no per-sample record from img2dataset"})
            elif m.status != "success" or m.key not in images:
                msg = m.error_message if m.status != "success" else "success without image bytes"
                ledger.drop(download_reason(m.status, msg), row_id=row_id, detail={"status": m.status, "error": msg})
            elif m.sha256 in seen:
                ledger.drop("exact_duplicate", row_id=row_id, image_id=m.sha256, detail={"duplicate_of_row": seen[m.sha256]})
            else:
                seen[m.sha256] = row_id
                size = {k: int(getattr(m, k)) for k in ("width", "height", "original_width", "original_height")}
                writer.add(m.sha256, images[m.key], cfg.encode_format, row_id=row_id, url=r.url, source=r.source, **size)
                ledger.info("downloaded", row_id=row_id, image_id=m.sha256, detail=size)
    ledger.write(stage_dir / "ledger" / f"{name}.parquet")
    shutil.rmtree(work, ignore_errors=True)
    counts = ledger.counts()
    return {"rows": len(shard.rows), "downloaded": len(seen), **{f"drop:{k}": v for k, v in counts["drop"].items()}}


def exact_dedup(stage_dir: Path) -> tuple[pd.DataFrame, Path]:
    """Across shards: the same content hash twice -> keep the first row, drop the others."""
    tables = [s.read_table(["image_id", "row_id"]).assign(shard=s.name) for s in list_shards(stage_dir / "shards")]
    allrows = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["image_id", "row_id", "shard"])
    allrows = allrows.sort_values("row_id", kind="stable")
    dups = allrows[allrows.duplicated("image_id", keep="first")]
    first = allrows.drop_duplicates("image_id", keep="first").set_index("image_id")["row_id"]
    ledger = LedgerWriter("ingest")
    for d in dups.itertuples(index=False):
        ledger.drop("exact_duplicate", row_id=int(d.row_id), image_id=d.image_id,
                    detail={"duplicate_of_row": int(first[d.image_id])})  # fmt: skip
    path = stage_dir / "ledger" / "exact_dedup.parquet"
    ledger.write(path)
    with atomic_path(stage_dir / EXACT_DUPS) as tmp:
        dups[["image_id", "row_id", "shard"]].to_parquet(tmp, index=False)
    return dups, path


def ingest(data: DataConfig, stage_dir: Path, cfg: IngestConfig, tracker: ShardTracker) -> StageResult:
    guard = UrlGuard(cfg)
    dup_of = first_occurrence(data)
    totals: dict[str, int] = {}
    for index, rows in iter_shards(data, cfg.shard_size):
        shard = IngestShard(index, rows)
        add_counts(totals, tracker.run(shard_name(index), lambda: ingest_shard(shard, stage_dir, cfg, guard, dup_of)))
    dups, _ = exact_dedup(stage_dir)
    totals["drop:exact_duplicate"] = totals.get("drop:exact_duplicate", 0) + len(dups)
    totals["kept"] = totals.get("downloaded", 0) - len(dups)
    shutil.rmtree(stage_dir / "work", ignore_errors=True)
    outputs = [p for s in list_shards(stage_dir / "shards") for p in (s.tar, s.table)]
    outputs += sorted((stage_dir / "ledger").glob("*.parquet")) + [stage_dir / EXACT_DUPS]
    return StageResult(
        counts=summarize(totals),
        outputs=outputs,
        extra={"shards": len(list_shards(stage_dir / "shards")), "img2dataset": _img2dataset_version()},
    )


def excluded_ids(stage_dir: Path) -> set[str]:
    path = stage_dir / EXACT_DUPS
    return set(pd.read_parquet(path, columns=["image_id"])["image_id"]) if path.is_file() else set()


def _img2dataset_version() -> str:
    from importlib.metadata import version

    return version("img2dataset")

