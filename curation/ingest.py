"""Ingest: URL list -> plan -> guard -> img2dataset download (per shard) -> canonical image shards + ledger.

1. :func:`~curation.urls.plan_shards` reads the list once, in chunks, and fixes the shard assignment on disk.
2. Each shard (:func:`ingest_shard`, a pure function of files, fanned out by the caller's mapper) records every
   row (``info input``), drops duplicate URLs, list rows that did not parse and guarded URLs, and drives
   img2dataset's ``Downloader`` in-process through the guarded opener (:mod:`curation.netguard`) and resizer
   (:mod:`curation.imageguard`). Its per-sample parquet is reconciled against the rows: every row ends in
   ``info downloaded`` (with the image id = sha256 of the downloaded bytes, sizes and perceptual hash) or a
   ``drop`` with a reason code (img2dataset's raw message in ``detail``).
3. :func:`finish` drops exact (same sha256) and perceptual-hash duplicates across shards, first row wins, and
   writes ``duplicates.parquet`` (what later stages skip).

:func:`retry_failed` re-downloads only the rows whose latest outcome is a failed download (optionally of given
reasons) into new shards ``r<attempt>-<shard>``; earlier shards are never rewritten (see :mod:`infra.lineage`).
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image

from curation.imageguard import guarded_resizer, resizing_in_download_threads
from curation.netguard import UrlGuard, Verdict
from curation.opener import guarded_opener
from curation.phash import distance, near_duplicates, phash, to_hex
from curation.reasons import TRANSIENT, not_retryable_matches, reason, retryable
from curation.urls import parse_face_boxes, plan_shards, read_rows, url_duplicates
from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig
from infra.lineage import LEDGER_SCHEMA, LedgerParts, LedgerWriter, ledger_dir
from infra.shards import ShardWriter, iter_tar, list_shards
from infra.stage import ShardTracker, StageResult, add_counts, move_shard, summarize
from infra.storage import Markers, atomic_path

DUPLICATES = "duplicates.parquet"
DEDUP_LEDGER = "_dedup"  # the cross-shard duplicates' ledger: _dedup-00000.parquet, ... (LedgerParts)
PLAN = "plan"
SHARD_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("ext", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
     ("row_id", pa.int64()), ("url", pa.string()), ("source", pa.string()), ("width", pa.int32()),
     ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()), ("phash", pa.int64()),
     ("face_boxes", pa.string()), ("caption", pa.string()), ("extra", pa.string())]
)  # fmt: skip

log = logging.getLogger("lvd")
Mapper = Callable[[Callable[..., Any], list[tuple[Any, ...]]], Iterable[Any]]


def serial_map(fn: Callable[..., Any], items: list[tuple[Any, ...]]) -> Iterator[Any]:
    """The default mapper (no Prefect): one shard after another, results as they finish."""
    for args in items:
        yield fn(*args)


_DOWNLOAD_NEEDLES = (
    ("destination refused", "url_private"),
    ("not a validated host name", "url_malformed"),
    ("redirect to a refused url", "redirect_refused"),
    ("redirect to a malformed url", "redirect_malformed"),
    ("infinite loop", "redirect_loop"),
    ("refused content type", "content_type"),
    ("response larger than", "too_large"),
    ("x-robots-tag", "robots_disallowed"),
    ("timed out", "timeout"),
    ("timeout", "timeout"),
    ("name or service not known", "dns_error"),
    ("temporary failure in name resolution", "dns_error"),
    ("no address associated with hostname", "dns_error"),
    ("nodename nor servname", "dns_error"),
    ("connection reset", "connection_reset"),
    ("connection refused", "connection_refused"),
    ("remote end closed", "connection_closed"),
    ("incompleteread", "connection_closed"),
    ("incomplete read", "connection_closed"),
    ("[ssl", "tls_error"),
    ("certificate verify failed", "tls_error"),
)
_FIRST_NEEDLES = 5  # refusals and redirects come with an HTTP code too: matched before it
# Local files (ingest.local_roots): checked first, their messages name a path that may hold any other needle.
_FILE_NEEDLES = (("outside ingest.local_roots", "path_outside_roots"), ("no such file or directory", "file_missing"),
                 ("is a directory", "file_missing"), ("permission denied", "file_unreadable"))
_IMAGE_NEEDLES = (
    ("empty response", "empty_response"),
    ("not an image", "not_an_image"),
    ("unsupported format", "unsupported_format"),
    ("truncated", "truncated_image"),
    ("too many pixels to decode", "decompression_bomb"),
    ("too small", "image_too_small"),
    ("area too large", "image_too_large"),
    ("aspect ratio", "aspect_ratio_too_large"),
)


def download_reason(status: str, message: str | None) -> str:
    """A stable reason code for img2dataset's per-sample status and error message."""
    m = (message or "").lower()
    if status == "failed_to_download":
        for needle, code in _FILE_NEEDLES:
            if needle in m:
                return code
        for needle, code in _DOWNLOAD_NEEDLES[:_FIRST_NEEDLES]:
            if needle in m:
                return code
        if status_code := re.search(r"http error (\d{3})", m):
            return f"http_{status_code.group(1)}"
        for needle, code in _DOWNLOAD_NEEDLES[_FIRST_NEEDLES:]:
            if needle in m:
                return code
        return "download_error"
    for needle, code in _IMAGE_NEEDLES:
        if needle in m:
            return code
    return "decode_error"


COLUMNS = ["row_id", "source", "caption", "url"]


def run_img2dataset(rows: pd.DataFrame, work: Path, cfg: IngestConfig) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """Download ``rows`` with img2dataset into ``work``; return its per-sample table and images by key."""
    from img2dataset.downloader import Downloader
    from img2dataset.writer import WebDatasetSampleWriter

    work.mkdir(parents=True, exist_ok=True)
    arrow_path = work / "input.arrow"
    frame = rows[COLUMNS].reset_index(drop=True).astype({"source": "string", "caption": "string", "url": "string"})
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    resizer = guarded_resizer(cfg)
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
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
    with guarded_opener(cfg), resizing_in_download_threads(resizer):  # a shard's images decoded on every CPU
        ok, _ = downloader((0, str(arrow_path)))
    if not ok:
        raise RuntimeError(f"img2dataset failed on shard input {arrow_path} (see the traceback above)")
    meta = pq.read_table(work / "out" / "00000.parquet").to_pandas()
    images = {key: data for key, ext, data in iter_tar(work / "out" / "00000.tar") if ext == cfg.encode_format}
    return meta, images


@dataclass(frozen=True)
class ShardJob:
    """One shard of work: everything is read from and written to files under ``stage_dir``."""

    stage_dir: Path
    name: str  # "00003", or "r1-00003" for the first retry of shard 00003
    cfg: IngestConfig
    attempt: int = 0


def _drop(ledger: LedgerWriter, why: str, **kw: Any) -> None:
    reason(why)  # every reason recorded is in curation/reasons.py's table (KeyError otherwise)
    ledger.drop(why, **kw)


def _record_row(job: ShardJob, r: Any, ledger: LedgerWriter, verdict: Verdict | None) -> None:
    """The row's first event: the URL as listed; the URL fetched instead when normalisation changed it."""
    row_id = int(r.row_id)
    if job.attempt:
        ledger.info("retry", row_id=row_id, url=r.url, detail={"attempt": job.attempt, "previous": r.previous})
        return
    detail = {"source": r.source, "caption": r.caption}
    if getattr(r, "extra", None) is not None:  # data.extra_cols, as listed
        detail["extra"] = json.loads(r.extra)
    if verdict is not None and verdict.url is not None and verdict.url != r.url:
        detail["fetch_url"] = verdict.url
    if verdict is not None and verdict.stripped:
        detail["credentials"] = "stripped"  # ingest.url_credentials: strip
    ledger.info("input", row_id=row_id, url=r.url, detail=detail)


def _first_rows(job: ShardJob, rows: pd.DataFrame, ledger: LedgerWriter, guard: UrlGuard
                ) -> tuple[list[Any], dict[int, str | None]]:
    """Record every row, drop what must not be fetched; return the rows to download (``url``: the normalised URL
    to fetch) and their given face boxes (normalised JSON, None where none were given)."""
    lo, hi = (int(rows["row_id"].min()), int(rows["row_id"].max()) + 1) if len(rows) else (0, 0)
    dup_of = url_duplicates(job.stage_dir / PLAN, lo, hi) if job.attempt == 0 else {}
    fetch, boxes = [], {}
    for r in rows.itertuples(index=False):
        row_id = int(r.row_id)
        verdict = guard.decide(r.url) if r.list_error is None else None
        _record_row(job, r, ledger, verdict)
        if verdict is None:
            _drop(ledger, "list_row_malformed", row_id=row_id, detail={"error": r.list_error})
        elif row_id in dup_of:
            _drop(ledger, "url_duplicate", row_id=row_id, detail={"duplicate_of_row": dup_of[row_id]})
        elif verdict.reason:
            _drop(ledger, verdict.reason, row_id=row_id, detail={"url": None if r.url is None else str(r.url)[:300]})
        else:
            text = getattr(r, "face_boxes", None)
            try:
                boxes[row_id] = None if text is None else json.dumps(parse_face_boxes(text))
            except ValueError as err:
                _drop(ledger, "face_boxes_malformed", row_id=row_id, detail={"error": str(err)})
                continue
            fetch.append(r._replace(url=verdict.url))
    return fetch, boxes


def ingest_shard(job: ShardJob) -> tuple[str, dict[str, int]]:
    """Guard, download and record one shard; writes its shard files and ledger. The caller marks it done."""
    cfg = job.cfg
    rows = read_rows(job.stage_dir / PLAN / "inputs" / f"{job.name}.parquet")
    if "previous" not in rows.columns:
        rows["previous"] = None
    ledger = LedgerWriter("ingest", attempt=job.attempt)
    fetch, boxes = _first_rows(job, rows, ledger, UrlGuard(cfg))
    listed = dict(zip(rows["row_id"].astype("int64"), rows["url"], strict=True))  # the URLs as the list has them
    work = job.stage_dir / "work" / job.name
    shutil.rmtree(work, ignore_errors=True)
    meta, images = (
        run_img2dataset(pd.DataFrame(fetch, columns=rows.columns), work, cfg)
        if fetch
        else (pd.DataFrame(columns=["row_id", "status", "error_message", "key", "sha256"]), {})
    )
    seen: dict[str, tuple[int, int]] = {}  # sha256 -> (first row, phash)
    by_row = {int(m.row_id): m for m in meta.itertuples(index=False)}
    writer = ShardWriter(job.stage_dir / "shards", job.name)
    try:
        for r in sorted(fetch, key=lambda r: int(r.row_id)):
            row_id = int(r.row_id)
            m = by_row.get(row_id)
            if m is None:
                _drop(ledger, "lost_by_downloader", row_id=row_id, detail={"note": "no per-sample record from img2dataset"})
            elif m.status != "success" or m.key not in images:
                msg = m.error_message if m.status != "success" else "success without image bytes"
                _drop(ledger, download_reason(m.status, msg), row_id=row_id, detail={"status": m.status, "error": msg})
            elif m.sha256 in seen:  # same bytes twice in one shard: stored once (a member is named by its id)
                first_row, h = seen[m.sha256]
                detail = {"duplicate_of_row": first_row, "duplicate_of": m.sha256, "phash": to_hex(h)}
                ledger.drop("exact_duplicate", row_id=row_id, image_id=m.sha256, detail=detail)
            else:
                data = images[m.key]
                with Image.open(io.BytesIO(data)) as im:
                    h = phash(im)
                seen[m.sha256] = (row_id, h)
                size = {k: int(getattr(m, k)) for k in ("width", "height", "original_width", "original_height")}
                writer.add(m.sha256, data, cfg.encode_format, row_id=row_id, url=listed[row_id], source=r.source, **size, phash=h,
                           face_boxes=boxes[row_id], caption=r.caption, extra=r.extra)  # fmt: skip
                ledger.info("downloaded", row_id=row_id, image_id=m.sha256, detail={**size, "phash": to_hex(h)})
    except BaseException:
        writer.abort()
        raise
    writer.close(SHARD_SCHEMA)
    ledger.write(job.stage_dir / "ledger" / f"{job.name}.parquet")
    shutil.rmtree(work, ignore_errors=True)
    counts: dict[str, int] = {"rows": len(rows) if job.attempt == 0 else 0, "downloaded": len(seen)}
    for why, n in ledger.counts()["drop"].items():
        counts[f"drop:{why}"] = counts.get(f"drop:{why}", 0) + n
    if job.attempt:  # the retried rows' previous outcomes no longer count
        counts["retried"] = len(rows)
        for prev, n in rows["previous"].value_counts().items():
            counts[f"drop:{prev}"] = counts.get(f"drop:{prev}", 0) - int(n)
    return job.name, counts


def _shard_attempt(name: str) -> int:
    m = re.match(r"r(\d+)-", name)
    return int(m.group(1)) if m else 0


def dedup_across_shards(stage_dir: Path, cfg: IngestConfig) -> pd.DataFrame:
    """Exact then perceptual-hash duplicates over every shard, first row wins; writes the table and ledger.

    Perceptual: a hash at most ``cfg.phash_max_distance`` bits from an earlier kept image's (0: equal hashes); an
    exact duplicate is matched by sha256 only (with ``exact_dedup`` off it is a perceptual duplicate at distance 0).
    Holds (image_id, row_id, phash) of every downloaded image in memory: about 100 B per image.
    """
    tables = [
        s.read_table(["image_id", "row_id", "phash"]).assign(shard=s.name, attempt=_shard_attempt(s.name))
        for s in list_shards(stage_dir / "shards")
    ]
    cols = ["image_id", "row_id", "phash", "shard", "attempt"]
    df = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=cols)
    df = df.sort_values("row_id", kind="stable").reset_index(drop=True)
    first_of_id = df.drop_duplicates("image_id").set_index("image_id")["row_id"]
    exact = df.duplicated("image_id") if cfg.exact_dedup else pd.Series(False, index=df.index)
    df["reason"] = None
    df.loc[exact, "reason"] = "exact_duplicate"
    df["duplicate_of_row"] = df["image_id"].map(first_of_id)
    df["duplicate_of"] = df["image_id"]
    df["distance"] = 0  # bits between the phash and the duplicate-of image's
    if cfg.phash_dedup:
        alive = df[~exact]
        first = near_duplicates(alive["phash"].to_numpy(np.int64), cfg.phash_max_distance)
        ph, src = alive.index[first >= 0], alive.index[first[first >= 0]]
        df.loc[ph, "reason"] = "phash_duplicate"
        df.loc[ph, "duplicate_of_row"] = df.loc[src, "row_id"].to_numpy()
        df.loc[ph, "duplicate_of"] = df.loc[src, "image_id"].to_numpy()
        pairs = zip(df.loc[ph, "phash"], df.loc[src, "phash"], strict=True)
        df.loc[ph, "distance"] = [distance(int(a), int(b)) for a, b in pairs]
    dups = df[df["reason"].notna()].reset_index(drop=True)
    ledger = LedgerParts("ingest", ledger_dir(stage_dir), name=DEDUP_LEDGER)
    for d in dups.itertuples(index=False):
        detail = {"duplicate_of_row": int(d.duplicate_of_row), "duplicate_of": d.duplicate_of,
                  "phash": to_hex(int(d.phash))}  # fmt: skip
        if d.reason == "phash_duplicate":
            detail["distance"] = int(d.distance)
        ledger.drop(d.reason, row_id=int(d.row_id), image_id=d.image_id, attempt=int(d.attempt), detail=detail)
    ledger.close()
    out = dups[["image_id", "row_id", "shard", "reason", "duplicate_of_row", "duplicate_of", "phash", "distance"]]
    with atomic_path(stage_dir / DUPLICATES) as tmp:
        types = {"row_id": "int64", "duplicate_of_row": "int64", "phash": "int64", "distance": "int64"}
        out.astype(types).to_parquet(tmp, index=False)
    return out


def finish(stage_dir: Path, cfg: IngestConfig, tracker: ShardTracker) -> StageResult:
    """Cross-shard dedup, counts from every shard's marker (retries included), the stage's outputs."""
    dups = dedup_across_shards(stage_dir, cfg)
    totals: dict[str, int] = {}
    for name in tracker.markers.done():
        add_counts(totals, tracker.info(name))
    for why, n in dups["reason"].value_counts().items():
        totals[f"drop:{why}"] = totals.get(f"drop:{why}", 0) + int(n)
    totals["kept"] = totals.get("downloaded", 0) - len(dups)
    totals = {k: v for k, v in totals.items() if v or not k.startswith("drop:")}
    shutil.rmtree(stage_dir / "work", ignore_errors=True)
    shards = list_shards(stage_dir / "shards")
    outputs = [p for s in shards for p in (s.tar, s.table)]
    outputs += [*sorted((stage_dir / "ledger").glob("*.parquet")), stage_dir / DUPLICATES]
    attempts = sorted({_shard_attempt(s.name) for s in shards})
    return StageResult(
        counts=summarize(totals),
        outputs=outputs,
        extra={"shards": len(shards), "attempts": attempts, "img2dataset": _img2dataset_version()},
    )


def take_over(previous: Path, stage_dir: Path, shards: list[str]) -> list[str]:
    """Completed shards of a stale attempt (``previous``: the same configuration, the URL list since changed) that
    stay valid, moved into ``stage_dir``; returns them. Shards are looked at in order up to the first whose planned
    rows (URL, caption, every column) changed: up to there no row's outcome can change (a URL duplicate points to an
    earlier row, the first row keeps its URL), so a list with rows added at its end keeps all its completed shards.
    A shard that ``retry-failed`` downloaded again in part is downloaded anew rather than taken (its retries are
    shards of their own). Files move one by one, the completion marker last: an interrupted take-over leaves shards
    either taken or to be downloaded."""
    retried = {p.stem.split("-", 1)[1] for p in (previous / PLAN / "inputs").glob("r*-*.parquet")}
    taken = []
    for name in shards:
        old_input, new_input = (d / PLAN / "inputs" / f"{name}.parquet" for d in (previous, stage_dir))
        if not old_input.is_file() or not pq.read_table(old_input).equals(pq.read_table(new_input)):
            break
        if name in retried or Markers(stage_dir).is_done(name) or not Markers(previous).is_done(name):
            continue
        move_shard(previous, stage_dir, name, [Path("shards") / f"{name}.tar", Path("shards") / f"{name}.parquet",
                                               Path("ledger") / f"{name}.parquet"])  # fmt: skip
        taken.append(name)
    return taken


def ingest(
    data: DataConfig, stage_dir: Path, cfg: IngestConfig, tracker: ShardTracker, mapper: Mapper = serial_map,
    previous: Path | None = None,
) -> StageResult:
    """Plan, then download every shard not done; ``previous``: a stale attempt whose unchanged shards are taken
    over (:func:`take_over`) rather than downloaded again."""
    plan = plan_shards(data, cfg, stage_dir / PLAN)
    if previous is not None:
        taken = take_over(previous, stage_dir, plan.shards)
        if taken:
            log.info("ingest: %d of %d shards taken over from the previous attempt (their rows are unchanged in "
                     "the list)", len(taken), len(plan.shards))  # fmt: skip
    todo = [(ShardJob(stage_dir, name, cfg),) for name in plan.shards if not tracker.is_done(name)]
    for name, counts in mapper(ingest_shard, todo):
        tracker.done(name, counts)
    return finish(stage_dir, cfg, tracker)


# --- retry-failed ------------------------------------------------------------------------------------------


def _ingest_events(stage_dir: Path) -> pd.DataFrame:
    files = [str(p) for p in sorted((stage_dir / "ledger").glob("*.parquet"))]
    if not files:
        return pd.DataFrame(columns=LEDGER_SCHEMA.names)
    cols = ["row_id", "kind", "reason", "attempt", "detail"]
    return ds.dataset(files, schema=LEDGER_SCHEMA).to_table(columns=cols, filter=ds.field("row_id").is_valid()).to_pandas()


def failed_rows(stage_dir: Path, reasons: list[str] | None = None) -> pd.DataFrame:
    """Rows whose latest ingest outcome is a failed download: row_id, reason, attempt.

    ``reasons``: shell-style patterns (``http_5*``); None means the transient failures (class ``transient`` in
    :mod:`curation.reasons`). Reasons of class ``policy``, and those decided without downloading, are refused.
    """
    ev = _ingest_events(Path(stage_dir))
    ev["attempt"] = ev["attempt"].fillna(0).astype("int64")
    latest = ev.groupby("row_id")["attempt"].transform("max")
    drops = ev[(ev["kind"] == "drop") & (ev["attempt"] == latest)][["row_id", "reason", "attempt"]]
    patterns = list(reasons) if reasons else list(TRANSIENT)
    if bad := not_retryable_matches(patterns, before_download=True):
        raise ValueError(f"reasons {bad} are decided without downloading; a retry cannot change them")
    if bad := not_retryable_matches(patterns):
        raise ValueError(f"reasons {bad} are decided by the run's policy (class policy in docs/ingest.md: robots "
                         "opt-outs, size limits, refused redirects...); a retry would decide the same")  # fmt: skip
    keep = drops["reason"].map(lambda r: any(fnmatch.fnmatchcase(r, p) for p in patterns) and retryable(r))
    return drops[keep].sort_values("row_id").reset_index(drop=True)


@dataclass
class RetryPlan:
    attempt: int
    jobs: list[ShardJob]
    rows: pd.DataFrame  # row_id, reason, attempt (the failure being retried)


def plan_retry(stage_dir: Path, cfg: IngestConfig, reasons: list[str] | None = None) -> RetryPlan:
    """Write the inputs of the retry shards ``r<attempt>-<shard>``: the failed rows of each original shard."""
    stage_dir = Path(stage_dir)
    failed = failed_rows(stage_dir, reasons)
    ev = _ingest_events(stage_dir)
    attempt = int(ev["attempt"].fillna(0).max()) + 1 if len(ev) else 1
    jobs = []
    shard_size = int(_plan_info(stage_dir)["shard_size"])
    for shard_index, group in failed.groupby(failed["row_id"] // shard_size):
        original = f"{int(shard_index):05d}"
        rows = read_rows(stage_dir / PLAN / "inputs" / f"{original}.parquet")
        rows = rows[rows["row_id"].isin(group["row_id"])].copy()
        rows["previous"] = rows["row_id"].map(group.set_index("row_id")["reason"])
        name = f"r{attempt}-{original}"
        with atomic_path(stage_dir / PLAN / "inputs" / f"{name}.parquet") as tmp:
            rows.to_parquet(tmp, index=False)
        jobs.append(ShardJob(stage_dir, name, cfg, attempt))
    return RetryPlan(attempt, jobs, failed)


def _plan_info(stage_dir: Path) -> dict[str, Any]:
    from infra.storage import read_json

    return read_json(stage_dir / PLAN / "plan.json")


def retry_failed(
    stage_dir: Path, cfg: IngestConfig, tracker: ShardTracker, reasons: list[str] | None = None, mapper: Mapper = serial_map
) -> tuple[RetryPlan, StageResult]:
    plan = plan_retry(stage_dir, cfg, reasons)
    for name, counts in mapper(ingest_shard, [(job,) for job in plan.jobs]):
        tracker.done(name, counts)
    return plan, finish(stage_dir, cfg, tracker)


def excluded(stage_dir: Path) -> dict[str, set[str]]:
    """shard -> image ids later stages skip (cross-shard duplicates found by :func:`finish`)."""
    path = Path(stage_dir) / DUPLICATES
    if not path.is_file():
        return {}
    df = pd.read_parquet(path, columns=["shard", "image_id"])
    return {s: set(g["image_id"]) for s, g in df.groupby("shard")}


def _img2dataset_version() -> str:
    from importlib.metadata import version

    return version("img2dataset")
