"""Look-ups through the lineage index: the chain of an image, an input row or a URL, reading only the ledger row
groups the index names (:mod:`infra.lineage_index`). The result is the one a full scan gives
(:meth:`infra.lineage.Ledger.chain`): the same events, in the same order.

Every stage's index is brought up to date with its ledger before it is used, and a file found changed while reading
makes that stage's index rebuilt and the look-up start again: the index is never trusted over the ledger.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.lineage import LEDGER_SCHEMA, ledger_dir, order_events, url_key
from infra.lineage_index import connect, image_keys, prefix_range, split_loc, sync, url_hash

MAX_CANDIDATES = 10  # ids listed when a prefix is ambiguous
_CHUNK = 500  # keys per SQL statement
HEX = frozenset("0123456789abcdef")
T = TypeVar("T")


class AmbiguousId(LookupError):
    def __init__(self, prefix: str, candidates: list[str], more: bool = False):
        self.prefix, self.candidates, self.more = prefix, candidates, more
        listed = "\n".join(f"  {c}" for c in candidates) + ("\n  ..." if more else "")
        super().__init__(f"image id prefix {prefix!r} is ambiguous: {'more than ' if more else ''}"
                         f"{len(candidates)} images start with it:\n{listed}\ngive more characters")  # fmt: skip


class _Stale(Exception):
    def __init__(self, stage_dir: Path):
        self.stage_dir = stage_dir


@dataclass
class IndexedLedger:
    """The read side of a run's ledger through its index. ``files_read``: the ledger files opened so far."""

    run_dir: Path
    files_read: set[Path] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        root = self.run_dir / "stages"
        self.stages = sorted(d for d in root.iterdir() if ledger_dir(d).is_dir()) if root.is_dir() else []
        self._conns: dict[Path, sqlite3.Connection] = {}
        self._groups: dict[tuple[Path, int], pa.Table] = {}

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def _conn(self, stage_dir: Path) -> sqlite3.Connection:
        if stage_dir not in self._conns:
            conn = connect(stage_dir)
            sync(conn, stage_dir)
            self._conns[stage_dir] = conn
        return self._conns[stage_dir]

    def _locs(self, table: str, column: str, keys: Iterable[int]) -> list[tuple[Path, int]]:
        keys = sorted({int(k) for k in keys})  # Python ints: sqlite3 binds a numpy integer as a blob
        out = set()
        for stage in self.stages:
            conn = self._conn(stage)
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                sql = f"SELECT DISTINCT loc FROM {table} WHERE {column} IN ({','.join('?' * len(chunk))})"
                out.update((stage, loc) for (loc,) in conn.execute(sql, chunk))
        return sorted(out)

    def _read(self, stage: Path, loc: int) -> pa.Table:
        """One row group (every column), checked against the index's record of its file first."""
        if (stage, loc) in self._groups:
            return self._groups[(stage, loc)]
        file_id, rg = split_loc(loc)
        name, size, mtime = self._conn(stage).execute("SELECT name, bytes, mtime_ns FROM files WHERE id=?",
                                                      (file_id,)).fetchone()  # fmt: skip
        path = ledger_dir(stage) / name
        st = path.stat() if path.is_file() else None
        if st is None or (st.st_size, st.st_mtime_ns) != (size, mtime):
            raise _Stale(stage)
        self.files_read.add(path)
        table = pq.ParquetFile(path).read_row_group(rg)
        n = table.num_rows
        cols = {c: table[c] if c in table.column_names else pa.nulls(n, LEDGER_SCHEMA.field(c).type)
                for c in LEDGER_SCHEMA.names}  # fmt: skip  (files from before a column existed)
        # Where each event sits, for the full scan's order: ledger files by path, events in file order.
        cols["_file"] = pa.array([str(path)] * n)
        cols["_rg"] = pa.array(np.full(n, rg, np.int32))
        cols["_pos"] = pa.array(np.arange(n, dtype=np.int64))
        self._groups[(stage, loc)] = pa.table(cols)
        return self._groups[(stage, loc)]

    def _events(self, locs: Iterable[tuple[Path, int]]) -> pa.Table:
        tables = [self._read(s, loc) for s, loc in locs]
        if not tables:
            return pa.table({**{c: pa.array([], LEDGER_SCHEMA.field(c).type) for c in LEDGER_SCHEMA.names},
                             "_file": pa.array([], pa.string()), "_rg": pa.array([], pa.int32()),
                             "_pos": pa.array([], pa.int64())})  # fmt: skip
        return pa.concat_tables(tables)

    def _retrying(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(*args)
        except _Stale as stale:  # a ledger file changed after it was indexed: rebuild that stage, start again
            self._groups.clear()
            sync(self._conn(stale.stage_dir), stale.stage_dir, force=True)
            return fn(*args)

    # -- look-ups ------------------------------------------------------------------------------------------------

    def resolve_image(self, prefix: str) -> str | None:
        """The one image id starting with ``prefix`` (lower-case hex), None when there is none; AmbiguousId when
        there are several."""
        return self._retrying(self._resolve_image, prefix.lower())

    def _resolve_image(self, prefix: str) -> str | None:
        lo, hi = prefix_range(prefix)
        keys: set[int] = set()
        for stage in self.stages:
            sql = "SELECT DISTINCT image FROM by_image WHERE image BETWEEN ? AND ? LIMIT ?"
            keys.update(k for (k,) in self._conn(stage).execute(sql, (lo, hi, MAX_CANDIDATES + 1)))
        if len(keys) > MAX_CANDIDATES:  # listed by their first 16 digits, without reading the ledger
            heads = sorted(f"{k & (2**64 - 1):016x}..." for k in keys)[:MAX_CANDIDATES]
            raise AmbiguousId(prefix, heads, more=True)
        ids = self._events(self._locs("by_image", "image", keys))["image_id"].drop_null()
        found = sorted(set(pc.filter(ids, pc.starts_with(ids, prefix)).to_pylist()))
        if len(found) > 1:
            raise AmbiguousId(prefix, found)
        return found[0] if found else None

    def chain(self, *, image_id: str | None = None, url: str | None = None, row_id: int | None = None) -> pd.DataFrame:
        """What :meth:`infra.lineage.Ledger.chain` gives (one of the three keys), read through the index."""
        return self._retrying(self._chain, image_id, url, row_id)

    def _chain(self, image_id: str | None, url: str | None, row_id: int | None) -> pd.DataFrame:
        images: set[str] = set()
        if image_id is not None:
            images = {image_id}
            first = self._events(self._locs("by_image", "image", image_keys(np.array([image_id], dtype=object))))
            mine = pc.equal(first["image_id"], image_id)
            rows = set(pc.filter(first["row_id"], pc.fill_null(mine, False)).drop_null().to_pylist())
        else:
            if url is not None:
                key = url_key(url)
                found = self._events(self._locs("by_url", "url", [url_hash(url)])).to_pandas()
                found = found[(found["reason"] == "input") & found["url"].notna()]
                rows = set(found.loc[found["url"].map(url_key) == key, "row_id"].dropna().astype("int64"))
            else:
                rows = {int(row_id)}
            of_rows = self._events(self._locs("by_row", "row_id", rows))
            in_rows = pc.fill_null(pc.is_in(of_rows["row_id"], pa.array(sorted(rows), pa.int64())), False)
            images = set(pc.filter(of_rows["image_id"], in_rows).drop_null().to_pylist())
        return self._collect(rows, images)

    def _collect(self, rows: set[int], images: set[str]) -> pd.DataFrame:
        if not rows and not images:
            return pd.DataFrame(columns=LEDGER_SCHEMA.names)
        locs = set(self._locs("by_row", "row_id", rows))
        locs |= set(self._locs("by_image", "image", image_keys(np.array(sorted(images), dtype=object))))
        events = self._events(sorted(locs))
        mask = pc.or_(pc.fill_null(pc.is_in(events["row_id"], pa.array(sorted(rows), pa.int64())), False),
                      pc.fill_null(pc.is_in(events["image_id"], pa.array(sorted(images), pa.string())), False))
        df = events.filter(mask).to_pandas()
        rank = {f: i for i, f in enumerate(sorted(set(df["_file"]), key=Path))}  # the full scan's order of files
        df = df.assign(_file=df["_file"].map(rank)).sort_values(["_file", "_rg", "_pos"], kind="stable")
        return order_events(df.drop(columns=["_file", "_rg", "_pos"]).reset_index(drop=True))


def parse_key(text: str) -> tuple[str, str | int]:
    """What `lvd lineage RUN KEY` looks up: ``("row", n)`` for ``row:N``; ``("image", prefix)`` for an image id or
    a prefix of one (at least 4 hex digits; a trailing ``…`` or ``...``, as ids are printed shortened, is ignored);
    otherwise ``("url", text)``."""
    key = text.strip()
    if key.lower().startswith("row:") and key[4:].strip().isdigit():
        return "row", int(key[4:])
    short = key.removesuffix("…").removesuffix("...").lower()
    if 4 <= len(short) <= 64 and set(short) <= HEX:
        return "image", short
    return "url", text


def find_chain(run_dir: Path, text: str) -> tuple[pd.DataFrame, str]:
    """The chain of ``text`` (see :func:`parse_key`) and what it is the chain of (an image prefix resolved to the
    whole id). AmbiguousId when a prefix names several images."""
    kind, key = parse_key(text)
    ledger = IndexedLedger(run_dir)
    try:
        if kind == "image":
            image = ledger.resolve_image(str(key))
            return (ledger.chain(image_id=image), image) if image else (pd.DataFrame(), text)
        if kind == "row":
            return ledger.chain(row_id=int(key)), f"input row {key}"
        return ledger.chain(url=str(key)), text
    finally:
        ledger.close()
