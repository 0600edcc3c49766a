"""URL lists: read in chunks (memory does not grow with the list), numbered by row, guarded before download."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


class UrlListError(ValueError):
    pass


def list_files(path: Path, fmt: str) -> list[tuple[Path, str]]:
    path = Path(path)
    if not path.exists():
        raise UrlListError(f"URL list not found: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix in FORMATS) if path.is_dir() else [path]
    if not files:
        raise UrlListError(f"no .parquet/.csv/.jsonl URL lists in {path}")
    out = []
    for f in files:
        f_fmt = FORMATS.get(f.suffix) if fmt == "auto" else fmt
        if f_fmt is None:
            raise UrlListError(f"cannot tell the format of {f}; set data.input_format")
        out.append((f, f_fmt))
    return out


def _chunks(path: Path, fmt: str, chunk_rows: int) -> Iterator[pd.DataFrame]:
    try:
        if fmt == "parquet":
            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
                yield batch.to_pandas()
        elif fmt == "csv":
            reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 22))
            for batch in reader:
                yield batch.to_pandas()
        else:
            yield from pd.read_json(path, lines=True, chunksize=chunk_rows, dtype=False)
    except (OSError, ValueError) as err:  # truncated or corrupt list file
        raise UrlListError(f"cannot read URL list {path} ({fmt}): {err}") from err


def iter_url_rows(data: DataConfig, chunk_rows: int = 100_000) -> Iterator[pd.DataFrame]:
    """Yield chunks with columns row_id, url, caption, source; row_id counts rows across files in order."""
    if data.url_list is None:
        raise UrlListError("data.url_list is not set")
    next_row = 0
    for path, fmt in list_files(data.url_list, data.input_format):
        for chunk in _chunks(path, fmt, chunk_rows):
            if data.url_col not in chunk.columns:
                raise UrlListError(f"{path}: no column {data.url_col!r} (columns: {list(chunk.columns)}); set data.url_col")
            n = len(chunk)
            out = pd.DataFrame({"row_id": np.arange(next_row, next_row + n, dtype=np.int64)})
            out["url"] = chunk[data.url_col].astype("string").fillna("").to_numpy()
            for col, src in (("caption", data.caption_col), ("source", data.source_col)):
                vals = chunk[src] if src and src in chunk.columns else pd.Series([None] * n)
                out[col] = vals.astype("string").to_numpy()
            next_row += n
            yield out


def iter_shards(data: DataConfig, shard_size: int) -> Iterator[tuple[int, pd.DataFrame]]:
    """Fixed shards of ``shard_size`` consecutive rows: shard k holds rows [k*size, (k+1)*size)."""
    buf: list[pd.DataFrame] = []
    n_buf = 0
    shard = 0
    for chunk in iter_url_rows(data, chunk_rows=max(shard_size, 10_000)):
        buf.append(chunk)
        n_buf += len(chunk)
        while n_buf >= shard_size:
            rows = pd.concat(buf, ignore_index=True)
            yield shard, rows.iloc[:shard_size].reset_index(drop=True)
            rest = rows.iloc[shard_size:].reset_index(drop=True)
            buf, n_buf, shard = [rest], len(rest), shard + 1
    if n_buf:
        yield shard, pd.concat(buf, ignore_index=True)


def url_hash(urls: pd.Series) -> np.ndarray:
    """64-bit hashes of URLs (for exact-duplicate detection at 8 bytes per row)."""
    return pd.util.hash_pandas_object(urls.astype(str), index=False).to_numpy(np.uint64)


def first_occurrence(data: DataConfig) -> dict[int, int]:
    """row_id -> row_id of the first row with the same URL, for every duplicate row (one pass, 16 B/row)."""
    hashes, rows = [], []
    for chunk in iter_url_rows(data):
        hashes.append(url_hash(chunk["url"]))
        rows.append(chunk["row_id"].to_numpy())
    if not hashes:
        return {}
    h, r = np.concatenate(hashes), np.concatenate(rows)
    order = np.lexsort((r, h))
    h, r = h[order], r[order]
    dup = np.flatnonzero(h[1:] == h[:-1]) + 1
    first = r.copy()
    for i in dup:  # runs of equal hashes: the first row of the run is the original
        first[i] = first[i - 1]
    return {int(r[i]): int(first[i]) for i in dup}


@dataclass
class UrlGuard:
    """Refuse what must never be fetched: bad schemes, malformed URLs, private destinations (unless allowed)."""

    cfg: IngestConfig
    allow: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.allow = {h.lower() for h in self.cfg.allow_hosts}

    def check(self, url: str) -> str | None:
        """None if the URL may be fetched, else the reason it may not."""
        try:
            parts = urlsplit(url.strip())
            host = parts.hostname
            _ = parts.port
        except ValueError:
            return "url_malformed"
        if parts.scheme.lower() not in ("http", "https"):
            return "url_malformed" if not parts.scheme or not parts.netloc else "url_scheme"
        if not host or " " in url.strip():
            return "url_malformed"
        if host.lower() in self.allow or self.cfg.allow_private:
            return None
        return "url_private" if _is_private(host.lower()) else None


@lru_cache(maxsize=65536)
def _is_private(host: str) -> bool:
    """Loopback, private, link-local (cloud metadata 169.254.169.254), reserved: by literal or by DNS."""
    try:
        addrs = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        if host == "localhost" or host.endswith(".localhost"):
            return True
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False  # unresolvable: the download reports it
        addrs = [ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos]
    return any(
        a.is_private or a.is_loopback or a.is_link_local or a.is_reserved or a.is_multicast or a.is_unspecified
        for a in addrs
    )
