"""URL lists: read in chunks (memory does not grow with the list), numbered by row, planned into fixed shards.

A list is one file or a folder of them, read in file-name order, in any of img2dataset's input formats (parquet,
CSV, TSV, JSONL, a JSON array, plain text with one URL per line; text ones may be gzip, bzip2 or xz compressed);
``row_id`` is the position of a row across the files and never changes. :func:`plan_shards` reads the list once and writes

- ``inputs/<shard>.parquet``: the rows of each shard (shard k holds rows [k*size, (k+1)*size)): the shard
  assignment, fixed on disk, so reruns and retries read exactly the same rows;
- ``urldups/<bucket>.npy``: (row_id, first row_id with the same URL) for every duplicate URL, sorted by row. URLs
  are compared normalised (:func:`dedup_keys`); one that cannot be normalised is nobody's duplicate.

Duplicate URLs are found without holding the list: each row's 128-bit URL hash is appended to one of
``url_dedup_buckets`` files, and each bucket is then sorted on its own (peak memory about 24 B x rows / buckets).

Rows of a CSV, TSV or JSONL file that cannot be parsed (a file cut short by a failed copy ends in one) become rows
with an empty URL and ``list_error`` set: they are recorded as ``list_row_malformed``, never fatal. A parquet
file cannot be read at all without its footer, a JSON array not past a syntax error, and a cut compressed file is
detected at its end: each of these stops the stage before any download with a :class:`UrlListError` that names the
file and the fix (the stage's ``failed`` run event carries it too).
"""

from __future__ import annotations

import bz2
import collections
import contextlib
import csv
import gzip
import hashlib
import itertools
import json
import lzma
import os
import shutil
import urllib.parse
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig
from infra.errors import InputProblem
from infra.images import is_hidden, is_image_name
from infra.shards import shard_name
from infra.storage import atomic_path, atomic_write_json, files_fingerprint, read_json
from infra.urlnorm import UrlNormalizationError, normalize_url

# img2dataset's input formats (``input_format``: txt, csv, tsv, json, jsonl, parquet, each text one optionally .gz):
# a list prepared for img2dataset is read here as it is. Text lists may be gzip, bzip2 or xz compressed (told by the
# file's first bytes, whatever its name).
FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".txt": "txt"}
COMPRESSED = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz"}
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
ROW_COLUMNS = ["row_id", "url", "caption", "source", "list_error", "face_boxes", "extra"]
ROW_SCHEMA = pa.schema(
    [("row_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()), ("source", pa.string()),
     ("list_error", pa.string()), ("face_boxes", pa.string()), ("extra", pa.string())]
)  # fmt: skip
PLAN_FILE = "plan.json"
_HASH_DTYPE = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("row", "<i8")])


class UrlListError(ValueError, InputProblem):
    pass


def file_format(path: Path) -> str | None:
    """The list format a file name says (``urls.tsv.gz``: tsv), or None."""
    suffixes = [x.lower() for x in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def list_files(path: Path, fmt: str) -> list[tuple[Path, str]]:
    """(file, format) of a list: one file, or a folder's files whose names say a format (file-name order).
    ``fmt`` (``data.input_format``) overrides the names; img2dataset's ``tsv.gz`` etc. are its ``tsv``."""
    path = Path(path)
    fmt = fmt.removesuffix(".gz")
    if not path.exists():
        raise UrlListError(f"URL list not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and file_format(p))
        if not files:
            raise UrlListError(f"no URL lists in {path} (.parquet, .csv, .tsv, .jsonl, .json or .txt, text ones "
                               f"optionally .gz, .bz2 or .xz){_own_images(path)}")  # fmt: skip
    else:
        files = [path]
    out = []
    for f in files:
        f_fmt = file_format(f) if fmt == "auto" else fmt
        if f_fmt is None and is_image_name(f.name):
            raise UrlListError(f"{f} is an image, not a list of image URLs{_own_images(f)}")
        if f_fmt is None:
            raise UrlListError(f"cannot tell the format of {f} from its name; set data.input_format (parquet, csv, "
                               f"tsv, jsonl, json or txt)")  # fmt: skip
        out.append((f, f_fmt))
    return out


def _own_images(path: Path) -> str:
    """Where ``data.url_list`` is an image or a folder holding images: how to curate a folder of one's own images
    (empty otherwise; a folder's first 1,000 entries are looked at)."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        entries = itertools.islice(path.rglob("*"), 1000)
        found = next((p for p in entries if is_image_name(p.name)), None)
        if found is None:
            return ""
        lead = f": it holds images ({found}), not lists of their URLs"
    else:
        lead = ""
    name = f"{folder.name or 'images'}.parquet"
    return (f"{lead}. For a folder of your own images, write its list first: lvd folder-urls {folder} {name}, then "
            f"lvd run configs/own_folder.yaml data.url_list={name} \"ingest.local_roots=[{folder}]\"")


def url_list_fingerprint(data: DataConfig) -> str:
    """What the ingest stage's key knows of `data.url_list`'s contents (`infra.storage.files_fingerprint` of its
    files, formats included): an appended or edited list changes it, a copy elsewhere does not. A missing list gives
    "missing" (the stage itself then fails with the reason)."""
    if data.url_list is None or not Path(data.url_list).exists():
        return "missing"
    files = list_files(data.url_list, data.input_format)
    return files_fingerprint([p for p, _ in files]) + ":" + ",".join(fmt for _, fmt in files)


def _compression(path: Path) -> str | None:
    """The compression the file's first bytes say ("gzip", "bzip2" or "xz"; whatever its name), or None."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


def _open_text(path: Path, compression: str | None):
    """A list file as text: UTF-8, a byte-order mark dropped (Excel's CSVs), undecodable bytes replaced."""
    opener = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}.get(compression or "", open)
    return opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="")


MAX_RECORD_LINES = 1000  # physical lines one CSV/TSV record may span (a quoted caption with newlines: a few)


class _RunawayRecord(Exception):
    """A record still open after MAX_RECORD_LINES lines: a quote that never closes."""


class _Lines:
    """The lines of a text list as csv.reader pulls them, with the lines of the record being read kept, so that a
    record found broken can be replaced by its first line (recorded as malformed) and the rest read again."""

    def __init__(self, f: Iterator[str]):
        self.f, self.pending, self.current = iter(f), [], []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.pending.pop() if self.pending else next(self.f)
        self.current.append(line)
        if len(self.current) > MAX_RECORD_LINES:
            raise _RunawayRecord
        return line

    def take(self) -> list[str]:
        """The lines of the record just read (or being read)."""
        lines, self.current = self.current, []
        return lines

    def again(self, lines: list[str]) -> None:
        """Read ``lines`` again before the rest of the file."""
        self.pending.extend(reversed(lines))


def _delimited(f: Iterator[str], header: list[str], delimiter: str, url_col: str) -> Iterator[dict[str, object]]:
    """Rows of a CSV or TSV after its header. A field opened with a quote that does not close on its line (a stray
    quote in a caption) would swallow the following lines into that field, silently (until a later quote closes it)
    or into a parse error that stops the list (csv's field size limit): such a record is recorded as malformed
    (its first line) and the lines after it are read again as rows of their own. A record is taken as such when it
    is still open after MAX_RECORD_LINES lines, or when one of its continuation lines is itself a complete row with
    a URL (a quoted caption may hold newlines; it rarely holds lines of the list)."""
    lines, width = _Lines(f), len(header)
    at = header.index(url_col) if url_col in header else None

    def is_row(line: str) -> bool:
        fields = next(csv.reader([line], delimiter=delimiter, strict=False), [])
        return len(fields) == width and at is not None and "://" in fields[at]

    while True:
        try:
            for fields in csv.reader(lines, delimiter=delimiter, strict=False):
                record = lines.take()
                if len(record) > 1 and any(is_row(line) for line in record[1:]):
                    broken = record
                    break
                if not fields:
                    continue
                if len(fields) != width:
                    yield {"__error__": f"expected {width} fields, got {len(fields)}: {delimiter.join(fields)[:200]}"}
                else:
                    yield dict(zip(header, fields, strict=True))
            else:
                return
        except (_RunawayRecord, csv.Error):  # still open after MAX_RECORD_LINES, or csv's field size limit
            broken = lines.take()
        yield {"__error__": f"a quote opened on this line does not close on it (the lines after it are read as rows "
                            f"of their own): {broken[0].rstrip()[:200]}"}  # fmt: skip
        lines.again(broken[1:])


def _json_value(value: object, url_col: str) -> dict[str, object]:
    """A JSON object is a row; a JSON string is a URL (a list of plain URLs); anything else a malformed row."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        return {url_col: value}
    return {"__error__": f"not a JSON object or URL string: {json.dumps(value)[:200]}"}


def _json_lines(lines: Iterator[str], url_col: str) -> Iterator[dict[str, object]]:
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            yield {"__error__": f"not valid JSON ({err.msg}): {line.strip()[:200]}"}
            continue
        yield _json_value(rec, url_col)


def _json_array(f, path: Path, url_col: str, chunk_chars: int = 1 << 20) -> Iterator[dict[str, object]]:
    """The elements of a top-level JSON array, parsed one at a time from a buffer of ``chunk_chars`` (memory does
    not grow with the file). A syntax error cannot be skipped inside an array (where the next element starts is
    unknown), so it stops the stage before any download with the element and offset."""
    dec = json.JSONDecoder()
    buf, pos, done, eof, index = "", 0, 0, False, 0  # done: characters consumed before buf

    def more() -> bool:
        nonlocal buf, pos, done, eof
        text = f.read(chunk_chars)
        eof = not text
        done += pos
        buf, pos = buf[pos:] + text, 0
        return not eof

    def skip_space() -> str:  # the next non-blank character ("" at the end)
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos] if pos < len(buf) else ""

    def fail(what: str, at: int | None = None) -> UrlListError:  # at: the character in the file (default: pos's)
        return UrlListError(f"{path}: not a valid JSON array at element {index} (character {done + pos if at is None else at}): "
                            f"{what}; the stage stopped before any download. Fix or re-copy the file and rerun.")  # fmt: skip

    if skip_space() != "[":
        raise fail("expected '['")
    pos += 1
    if skip_space() == "]":
        return
    while True:
        skip_space()  # raw_decode does not skip leading blanks
        try:
            value, end = dec.raw_decode(buf, pos)
            if end == len(buf) and not eof and more():  # a number may go on in the next read
                continue
        except json.JSONDecodeError as err:
            at = done + err.pos
            if not eof and more():
                continue
            raise fail(f"{err.msg.removesuffix(' at')} (is the file cut short?)", at) from err
        pos = end
        yield _json_value(value, url_col)
        index += 1
        sep = skip_space()
        pos += 1
        if sep == "]":
            return
        if sep != ",":
            pos -= 1
            raise fail("expected ',' or ']'" if sep else "the array is not closed (is the file cut short?)")


def _records(f, path: Path, fmt: str, url_col: str) -> Iterator[dict[str, object]]:
    """One dict per row of a text list; a row that does not parse gives {"__error__": why}."""
    if fmt in ("csv", "tsv"):
        delimiter = "\t" if fmt == "tsv" else ","
        header = next(csv.reader([f.readline()], delimiter=delimiter), [])
        if not header:
            raise UrlListError(f"{path}: empty {fmt.upper()} (no header line)")
        yield from _delimited(f, header, delimiter, url_col)
    elif fmt == "txt":  # img2dataset's txt: one URL per line, no header
        yield from ({url_col: line.strip()} for line in f if line.strip())
    else:  # json or jsonl: an array of rows, or one row per line (told by the first character)
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        if first == "[":
            yield from _json_array(_PrefixedReader(first, f), path, url_col)
        else:
            yield from _json_lines(itertools.chain([first + f.readline()], f), url_col)


class _PrefixedReader:
    """``read`` of a text file whose first characters were already read (``prefix``)."""

    def __init__(self, prefix: str, f):
        self.prefix, self.f = prefix, f

    def read(self, n: int) -> str:
        if self.prefix:
            out, self.prefix = self.prefix + self.f.read(max(0, n - len(self.prefix))), ""
            return out
        return self.f.read(n)


def _text_chunks(path: Path, fmt: str, chunk_rows: int, url_col: str) -> Iterator[pd.DataFrame]:
    compression = _compression(path)
    try:
        with _open_text(path, compression) as f:
            records = _records(f, path, fmt, url_col)
            while batch := list(itertools.islice(records, chunk_rows)):
                yield pd.DataFrame.from_records(batch)
    except (EOFError, zlib.error, lzma.LZMAError, OSError) as err:
        if compression is None:
            raise
        raise UrlListError(  # a cut compressed file is detectable, unlike a cut text one: nothing is ingested
            f"cannot read URL list {path} ({compression}; truncated or corrupt? re-copy it): the stage stopped before "
            f"any download. Copy the file again from its source (check its size or checksum) and rerun. ({err})"
        ) from err


def _chunks(path: Path, fmt: str, chunk_rows: int, url_col: str = "url") -> Iterator[pd.DataFrame]:
    if fmt != "parquet":
        yield from _text_chunks(path, fmt, chunk_rows, url_col)
        return
    try:
        reader = pq.ParquetFile(path)
        # One thread: threaded column decoding left 17-30 MB of allocator slack per 24 MB list under CPU contention
        # (tests/curation/test_urls.py, RSS peak) for 10-20% of planning speed (1M rows: 6.2 s -> 7.3 s).
        for batch in reader.iter_batches(batch_size=chunk_rows, use_threads=False):
            yield batch.to_pandas()
    except (OSError, pa.ArrowInvalid) as err:  # no footer (truncated), or damaged pages
        raise UrlListError(
            f"cannot read URL list {path} (parquet; truncated or corrupt? re-copy it): a damaged parquet file cannot "
            f"be read (a truncated one has lost its footer), so the stage stopped before any download. Copy the file "
            f"again from its source (check its size or checksum) and rerun. ({err})"
        ) from err


def _column(chunk: pd.DataFrame, name: str | None, n: int) -> np.ndarray:
    if not name or name not in chunk.columns:
        return np.full(n, None, dtype=object)
    vals = chunk[name].astype("string").to_numpy(dtype=object, na_value=None)
    return vals


def _boxes_column(chunk: pd.DataFrame, name: str | None, n: int) -> np.ndarray:
    """Face boxes as JSON text (a list column is serialised; a string is kept as given and checked at ingest)."""
    if not name or name not in chunk.columns:
        return np.full(n, None, dtype=object)
    out = np.full(n, None, dtype=object)
    for i, v in enumerate(chunk[name].tolist()):
        if isinstance(v, str):
            out[i] = v if v.strip() else None  # an empty CSV cell: no boxes given
        elif v is not None and not (isinstance(v, float) and np.isnan(v)):
            try:
                out[i] = json.dumps([[float(c) for c in box] for box in v])
            except (TypeError, ValueError):
                out[i] = repr(v)[:300]  # not boxes: ingest records the row as face_boxes_malformed
    return out


def parse_face_boxes(text: str | None) -> list[tuple[float, float, float, float]]:
    """``[[x0, y0, x1, y1], ...]`` relative to the image (0-1; values a hair outside are clipped) from JSON text;
    raises ValueError for anything else, including an empty or inverted box."""
    if text is None:
        return []
    try:
        boxes = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"face boxes are not JSON: {text[:100]!r}") from err
    if not isinstance(boxes, list):
        raise ValueError(f"face boxes must be a list of [x0, y0, x1, y1]: {text[:100]!r}")
    out = []
    for box in boxes:
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(c, int | float) for c in box)):
            raise ValueError(f"a face box must be [x0, y0, x1, y1] in 0-1: {box!r}")
        if not all(-0.01 <= c <= 1.01 for c in box):
            raise ValueError(f"a face box must be relative to the image (0-1): {box!r}")
        x0, y0, x1, y1 = (min(1.0, max(0.0, float(c))) for c in box)
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"an empty or inverted face box: {box!r}")
        out.append((x0, y0, x1, y1))
    return out


def url_list_problems(data: DataConfig, most: int = 5, local_roots: Sequence[Path] | None = None) -> list[str]:
    """What stops ``data.url_list`` being read, found from the first row of each file (seconds, before any stage
    runs): no list files, a format that cannot be told, a file that cannot be opened or parsed (a damaged parquet
    footer, a compressed file that is not), a missing URL column; with ``local_roots`` (``ingest.local_roots``), a
    first row that is a ``file://`` URL ingest would refuse (no roots, or a file outside them: every row of a list
    `lvd folder-urls` wrote would be dropped). A missing list is reported by the run's own checks; problems further
    into a file (a cut JSON array, a compressed file cut short) stop the stage while it plans, still before any
    download."""
    if data.url_list is None or not Path(data.url_list).exists():
        return []
    try:
        files = list_files(data.url_list, data.input_format)
    except UrlListError as err:
        return [f"data.url_list: {err}"]
    problems: list[str] = []
    local: list[str] = []  # one file:// problem is enough: the rows of one list share their folder
    for path, fmt in files:
        try:
            chunk = next(_chunks(path, fmt, 1, data.url_col), None)
        except (OSError, ValueError) as err:  # UrlListError is a ValueError
            problems.append(f"data.url_list: {err}")
            continue
        if chunk is not None and data.url_col not in chunk.columns and "__error__" not in chunk.columns:
            problems.append(f"data.url_list: {missing_column(path, fmt, data.url_col, list(chunk.columns))}")
        if local_roots is not None and chunk is not None and data.url_col in chunk.columns and not local:
            local = _local_problem(chunk[data.url_col].iloc[0] if len(chunk) else None, local_roots)
            problems += local
        absent = [c for c in data.extra_cols if chunk is not None and c not in chunk.columns]
        if absent and fmt in ("parquet", "csv", "tsv"):  # columns fixed per file (a JSON row may just lack a key)
            problems.append(f"data.extra_cols: {absent} not in {path} (columns: {[str(c)[:80] for c in chunk.columns][:20]})")
    if len(problems) > most:
        problems = [*problems[:most], f"data.url_list: ... and {len(problems) - most} more files with problems"]
    return problems


def _local_problem(url: object, roots: Sequence[Path]) -> list[str]:
    """Why ingest would refuse a ``file://`` URL for where it lies (none for other URLs, or a file that is gone: that
    row alone is ``file_missing``)."""
    from curation.netguard import LocalFileRefused, local_file

    if not isinstance(url, str) or not url.strip().lower().startswith("file:"):
        return []
    if not roots:
        return [f"data.url_list: its rows are file:// URLs ({url[:200]}), read only under ingest.local_roots: set "
                "ingest.local_roots=[FOLDER] to the folder they are in (lvd folder-urls prints the line)"]
    try:
        local_file(url, roots)
    except LocalFileRefused as err:
        if err.reason == "path_outside_roots":
            return [f"ingest.local_roots: {[str(r) for r in roots]} does not hold the list's files ({url[:200]}): "
                    "every row would be dropped as path_outside_roots; set it to the folder they are in"]
    return []


def missing_column(path: Path, fmt: str, url_col: str, columns: list[str]) -> str:
    """Why a list without ``url_col`` cannot be read, and the fix: the column of another case (LAION's ``URL``), or
    a header line that is data (CC3M's TSV has none: img2dataset's docs add one)."""
    msg = f"{path}: no column {url_col!r} (columns: {[str(c)[:80] for c in columns][:20]})"
    near = [c for c in columns if str(c).strip().lower() == url_col.strip().lower()]
    if near:
        return f"{msg}: set data.url_col={near[0]}"
    if fmt in ("csv", "tsv") and any("://" in str(c) for c in columns):
        sep = "\\t" if fmt == "tsv" else ","
        fix = f": sed -i '1s/^/caption{sep}url\\n/' {path}" if _compression(path) is None else ""
        return (f"{msg}. Its first line is data, not a header: the file has no header line. Add one naming the "
                f"columns (for caption{sep}url rows{fix})")  # fmt: skip
    return f"{msg}; set data.url_col"


def iter_url_rows(data: DataConfig, chunk_rows: int = 100_000) -> Iterator[pd.DataFrame]:
    """Yield chunks with the columns of ROW_COLUMNS; row_id counts rows across files in order."""
    if data.url_list is None:
        raise UrlListError("data.url_list is not set")
    next_row = 0
    for path, fmt in list_files(data.url_list, data.input_format):
        for chunk in _chunks(path, fmt, chunk_rows, data.url_col):
            n = len(chunk)
            errors = _column(chunk, "__error__", n)
            if data.url_col not in chunk.columns and not all(e is not None for e in errors):
                raise UrlListError(missing_column(path, fmt, data.url_col, [c for c in chunk.columns if c != "__error__"]))
            urls = _column(chunk, data.url_col, n)
            out = pd.DataFrame({"row_id": np.arange(next_row, next_row + n, dtype=np.int64)})
            out["url"] = [("" if u is None else u) for u in urls]
            out["caption"] = _column(chunk, data.caption_col, n)
            out["source"] = _column(chunk, data.source_col, n)
            out["list_error"] = errors
            out["face_boxes"] = _boxes_column(chunk, data.face_boxes_col, n)
            out["extra"] = _extra_column(chunk, data.extra_cols, n)
            next_row += n
            yield out


def _json_scalar(v: object) -> object:
    """A list cell as JSON can hold it: NaN / NA / NaT -> None, numpy scalars -> Python, arrays -> lists, anything
    else unknown (timestamps, bytes) -> its text."""
    if isinstance(v, np.ndarray):
        return [_json_scalar(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_json_scalar(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_scalar(x) for k, x in v.items()}
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, np.generic):
        return _json_scalar(v.item())
    return v if isinstance(v, (str, int, float, bool)) else str(v)


def _extra_column(chunk: pd.DataFrame, cols: list[str], n: int) -> np.ndarray:
    """``data.extra_cols`` of each row as JSON text (a column a row lacks is null in it); None without extra_cols."""
    out = np.full(n, None, dtype=object)
    if not cols:
        return out
    values = {c: (chunk[c].tolist() if c in chunk.columns else [None] * n) for c in cols}
    for i in range(n):
        out[i] = json.dumps({c: _json_scalar(values[c][i]) for c in cols}, ensure_ascii=False)
    return out


def dedup_keys(urls: pd.Series) -> tuple[list[str], np.ndarray]:
    """The URLs as duplicates are found: normalised (:func:`infra.urlnorm.normalize_url`: ``HTTP://Example.com/a``
    and `` http://example.com/a`` are one URL), and a mask of the rows that have one. A URL that cannot be
    normalised (empty and null ones too) is never anyone's duplicate: the guard records it as ``url_malformed``."""
    keys, ok = [], np.zeros(len(urls), bool)
    for i, u in enumerate(urls.tolist()):  # no ``.str`` accessor: see url_hashes
        try:
            keys.append(normalize_url(u))
        except UrlNormalizationError:
            continue
        ok[i] = True
    return keys, ok


def url_hashes(urls: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes per URL (128 bits: collisions are negligible even at 1e9 rows)."""
    # No ``.str`` accessor: it caches itself on the Series (a reference cycle that keeps every chunk alive until
    # the next full garbage collection, so peak memory grew with the list).
    s = pd.Series(urls, dtype=object)
    h1 = pd.util.hash_pandas_object(s, index=False, hash_key="lvd-url-hash-one").to_numpy(np.uint64)
    h2 = pd.util.hash_pandas_object(s, index=False, hash_key="lvd-url-hash-two").to_numpy(np.uint64)
    return h1, h2


@dataclass
class Plan:
    dir: Path
    n_rows: int
    shards: list[str]

    def inputs(self, shard: str) -> Path:
        return self.dir / "inputs" / f"{shard}.parquet"


def _write_table(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_rows(path: Path) -> pd.DataFrame:
    """A plan's shard input; one written before a column existed reads with it empty."""
    rows = pq.read_table(path).to_pandas()
    for c in ROW_COLUMNS:
        if c not in rows.columns:
            rows[c] = None
    return rows


def plan_shards(data: DataConfig, cfg: IngestConfig, plan_dir: Path) -> Plan:
    """Read the list once: shard input files + duplicate-URL table. Reused as is when already complete."""
    plan_dir = Path(plan_dir)
    if (plan_dir / PLAN_FILE).is_file():
        info = read_json(plan_dir / PLAN_FILE)
        return Plan(plan_dir, info["n_rows"], info["shards"])
    shutil.rmtree(plan_dir, ignore_errors=True)
    (plan_dir / "inputs").mkdir(parents=True)
    buckets = _HashBuckets(plan_dir / "urlhash", cfg.url_dedup_buckets)
    shards: list[str] = []
    pending: pa.Table | None = None  # rows not yet in a shard file (Arrow memory: no Python objects per row)
    n_rows = 0
    for chunk in iter_url_rows(data, chunk_rows=cfg.chunk_rows):
        keys, ok = dedup_keys(chunk["url"])
        buckets.add(*url_hashes(keys), chunk["row_id"].to_numpy()[ok])
        del keys
        n_rows += len(chunk)
        table = pa.Table.from_pandas(chunk[ROW_COLUMNS], schema=ROW_SCHEMA, preserve_index=False)
        pending = table if pending is None else pa.concat_tables([pending, table])
        del chunk, table
        while pending.num_rows >= cfg.shard_size:
            shards.append(shard_name(len(shards)))
            _write_table(plan_dir / "inputs" / f"{shards[-1]}.parquet", pending.slice(0, cfg.shard_size))
            pending = pending.slice(cfg.shard_size)
    if pending is not None and pending.num_rows:
        shards.append(shard_name(len(shards)))
        _write_table(plan_dir / "inputs" / f"{shards[-1]}.parquet", pending)
    buckets.close()
    buckets.find_duplicates(plan_dir / "urldups")
    atomic_write_json(plan_dir / PLAN_FILE, {"n_rows": n_rows, "shards": shards, "shard_size": cfg.shard_size})
    return Plan(plan_dir, n_rows, shards)


class _HashBuckets:
    """(h1, h2, row) records spilled to ``n`` files by h1 % n; each file is later deduplicated on its own."""

    def __init__(self, root: Path, n: int):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.n = root, n
        self.files = [open(root / f"{b:04d}.bin", "wb") for b in range(n)]  # noqa: SIM115 - closed in close()

    def add(self, h1: np.ndarray, h2: np.ndarray, rows: np.ndarray) -> None:
        rec = np.empty(len(rows), _HASH_DTYPE)
        rec["h1"], rec["h2"], rec["row"] = h1, h2, rows
        bucket = (h1 % np.uint64(self.n)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")  # rows stay ascending inside each bucket
        rec, bucket = rec[order], bucket[order]
        bounds = np.searchsorted(bucket, np.arange(self.n + 1))
        for b in range(self.n):
            if bounds[b + 1] > bounds[b]:
                rec[bounds[b] : bounds[b + 1]].tofile(self.files[b])

    def close(self) -> None:
        for f in self.files:
            f.close()

    def find_duplicates(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for b in range(self.n):
            src = self.root / f"{b:04d}.bin"
            rec = np.fromfile(src, _HASH_DTYPE)
            pairs = first_occurrences(rec["h1"], rec["h2"], rec["row"])
            with atomic_path(out_dir / f"{b:04d}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, pairs)
            src.unlink()
        shutil.rmtree(self.root, ignore_errors=True)


def first_occurrences(h1: np.ndarray, h2: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(k, 2) int64 [row, first row with the same key] for every row whose key was seen before, sorted by row."""
    if len(rows) == 0:
        return np.zeros((0, 2), np.int64)
    order = np.lexsort((rows, h2, h1))
    h1, h2, rows = h1[order], h2[order], rows[order]
    new = np.r_[True, (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])]
    start = np.maximum.accumulate(np.where(new, np.arange(len(rows)), 0))
    pairs = np.stack([rows[~new], rows[start][~new]], axis=1).astype(np.int64)
    return pairs[np.argsort(pairs[:, 0], kind="stable")]


def url_duplicates(plan_dir: Path, lo: int, hi: int) -> dict[int, int]:
    """row -> first row with the same URL, for the duplicate rows in [lo, hi) (memory-mapped lookups)."""
    out: dict[int, int] = {}
    for path in sorted((Path(plan_dir) / "urldups").glob("*.npy")):
        pairs = np.load(path, mmap_mode="r")
        if len(pairs) == 0:
            continue
        a, b = np.searchsorted(pairs[:, 0], [lo, hi])
        out.update((int(r), int(f)) for r, f in np.asarray(pairs[a:b]))
    return out


FOLDER_LIST_SCHEMA = pa.schema([("url", pa.string()), ("source", pa.string())])


@dataclass(frozen=True)
class FolderListing:
    listed: int  # rows written
    skipped: int  # files left out for their suffix (all_files=False)
    skipped_examples: tuple[str, ...]  # a few of them, to show
    kept: int = 0  # rows of the list written before, kept as they were (an update)
    missing: int = 0  # of those, files no longer in the folder (ingest records them as file_missing)
    skipped_suffixes: tuple[tuple[str, int], ...] = ()  # (suffix, files) of the files left out, most first
    hidden: int = 0  # hidden files and files in hidden folders left out (all_files=False)


class FolderListError(ValueError):
    """The file to write is there already and is not a list `lvd folder-urls` wrote."""


def _digests(urls: list[str]) -> np.ndarray:
    """128-bit digests of URLs as fixed-width bytes (sortable, searchable)."""
    return np.array([hashlib.blake2b(u.encode(), digest_size=16).digest() for u in urls], dtype="S16")


def folder_url_list(folder: Path, out: Path, *, all_files: bool = False, fresh: bool = False,
                    chunk_rows: int = 100_000) -> FolderListing:  # fmt: skip
    """Write a URL list of ``file://`` URLs for the files under ``folder`` (sub-folders included, symbolic links to
    folders not followed), in sorted path order so that row ids are stable; ``source`` is the top-level
    sub-folder (or the folder's own name). Images only unless ``all_files`` (anything else is then recorded with
    its reason at ingest). Streams: memory holds one chunk of rows, not the listing.

    Where ``out`` is a list written before (and not ``fresh``), it is updated, not rewritten: its rows stay as they
    are, in their order (so a run of the updated list downloads and computes only what is new: the stages take
    over the shards whose rows are unchanged), files it does not hold yet are added after them in sorted order,
    and a listed file that is gone keeps its row (ingest records it as ``file_missing``). Memory then also holds a
    16-byte digest per listed row."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    before = None if fresh or not Path(out).exists() else _folder_list(Path(out))
    listed = skipped = kept = missing = hidden = 0
    examples: list[str] = []
    suffixes: collections.Counter[str] = collections.Counter()
    rows: list[tuple[str, str]] = []
    with contextlib.suppress(_Unchanged), atomic_path(Path(out)) as tmp, pq.ParquetWriter(tmp, FOLDER_LIST_SCHEMA) as writer:

        def flush() -> None:
            nonlocal listed
            if rows and before is not None:  # an update: only what the list does not hold yet
                new = ~np.isin(_digests([u for u, _ in rows]), old)
                rows[:] = [r for r, n in zip(rows, new, strict=True) if n]
            if rows:
                urls, sources = zip(*rows, strict=True)
                writer.write_table(pa.table({"url": list(urls), "source": list(sources)}, schema=FOLDER_LIST_SCHEMA))
                listed += len(rows)
                rows.clear()

        old = np.zeros(0, "S16")
        if before is not None:
            parts = []
            for batch in before.iter_batches(batch_size=chunk_rows, columns=["url", "source"]):
                writer.write_table(pa.Table.from_batches([batch]).cast(FOLDER_LIST_SCHEMA))
                urls = batch.column("url").to_pylist()
                parts.append(_digests(urls))
                missing += sum(not _file_of(u).is_file() for u in urls)
                kept += len(urls)
            old = np.sort(np.concatenate(parts)) if parts else old
            listed = kept
        for top, dirs, files in os.walk(folder):
            rel = Path(top).relative_to(folder)
            if not all_files:  # hidden folders (.thumbnails, @eaDir) hold copies and metadata, not the user's images
                hidden += sum(len(fs) for d in dirs if is_hidden(Path(d)) for _, _, fs in os.walk(Path(top) / d))
                dirs[:] = [d for d in dirs if not is_hidden(Path(d))]
            dirs.sort()
            source = rel.parts[0] if rel.parts else folder.name
            for name in sorted(files):
                path = Path(top) / name
                if not all_files and is_hidden(Path(name)):
                    hidden += 1
                    continue
                if not all_files and not is_image_name(name):
                    skipped += 1
                    suffixes[path.suffix.lower() or "(none)"] += 1
                    if len(examples) < 5:
                        examples.append(str(path.relative_to(folder)))
                    continue
                rows.append((path.as_uri(), source))
                if len(rows) >= chunk_rows:
                    flush()
        flush()
        if before is not None and listed == kept:
            raise _Unchanged  # the list stays the file it was (its fingerprint, and every run's key, unchanged)
    return FolderListing(listed, skipped, tuple(examples), kept, missing, tuple(suffixes.most_common()), hidden)


class _Unchanged(Exception):
    pass


def _folder_list(path: Path) -> pq.ParquetFile:
    """A list `lvd folder-urls` wrote, to update; anything else there is refused, not overwritten."""
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:  # unreadable as parquet: say so, keep the file
        raise FolderListError(f"{path} is there already and is not a URL list (cannot read it as parquet: {err}); "
                              f"give another file name, or --fresh to replace it") from None  # fmt: skip
    if set(f.schema_arrow.names) != set(FOLDER_LIST_SCHEMA.names):
        raise FolderListError(f"{path} is there already and is not a list `lvd folder-urls` wrote (columns "
                              f"{', '.join(f.schema_arrow.names)}); give another file name, or --fresh to replace it")
    return f


def _file_of(url: str) -> Path:
    from curation.netguard import file_url_path

    return file_url_path(urllib.parse.urlsplit(url).path)
