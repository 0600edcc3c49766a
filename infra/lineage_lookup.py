"""Look-ups through the lineage index: the chain of an image, an input row or a URL, reading only the ledger row
groups the index names (:mod:`infra.lineage_index`). The result is the one a full scan gives
(:meth:`infra.lineage.Ledger.chain`): the same events, in the same order.

Every stage's index is brought up to date with its ledger before it is used, and a file found changed while reading
makes that stage's index rebuilt and the look-up start again: the index is never trusted over the ledger.

Light on purpose (`lvd lineage` is a command people type): pyarrow's parquet reader, numpy and sqlite3, no pandas
and no pyarrow.compute, which would double the start-up; the events found are a few dozen dicts.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from infra.lineage import LEDGER_SCHEMA, event_order, ledger_dir, url_key
from infra.lineage_index import connect, image_keys, prefix_range, split_loc, sync, url_hash

if TYPE_CHECKING:
    import pandas as pd

MAX_CANDIDATES = 10  # ids listed when a prefix is ambiguous
_CHUNK = 500  # keys per SQL statement
HEX = frozenset("0123456789abcdef")
T = TypeVar("T")
Event = dict[str, Any]


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
class _Group:
    """One row group of a ledger file, as read: its table and the columns a look-up selects on."""

    path: Path
    index: int
    table: pa.Table
    row_id: np.ndarray  # float64 (NaN: no row)
    image_id: np.ndarray  # object (None: no image)

    def select(self, rows: set[int], images: set[str]) -> list[tuple[tuple[str, int, int], Event]]:
        hit = np.isin(self.row_id, np.array(sorted(rows), dtype=np.float64)) if rows else np.zeros(len(self.row_id), bool)
        if images:
            hit |= np.isin(self.image_id, np.array(sorted(images), dtype=object))
        return [((str(self.path), self.index, int(i)), self._event(int(i))) for i in np.flatnonzero(hit)]

    def _event(self, i: int) -> Event:
        row = self.table.slice(i, 1).to_pylist()[0]
        return {c: row.get(c) for c in LEDGER_SCHEMA.names}  # a file from before a column existed: None


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
        self._groups: dict[tuple[Path, int], _Group] = {}

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

    def _read(self, stage: Path, loc: int) -> _Group:
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
        table = pq.ParquetFile(path).read_row_group(rg, use_threads=False)  # one small read: threads cost more
        # to_pylist, not to_numpy: pyarrow converts strings to numpy through pandas (~0.5 s to import)
        rows = np.array([np.nan if r is None else r for r in table["row_id"].to_pylist()], dtype=np.float64)
        group = _Group(path, rg, table, rows, np.array(table["image_id"].to_pylist(), dtype=object))
        self._groups[(stage, loc)] = group
        return group

    def _groups_at(self, locs: Iterable[tuple[Path, int]]) -> list[_Group]:
        return [self._read(s, loc) for s, loc in locs]

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
        found = set()
        for group in self._groups_at(self._locs("by_image", "image", keys)):
            found.update(i for i in set(group.image_id) if isinstance(i, str) and i.startswith(prefix))
        if len(found) > 1:
            raise AmbiguousId(prefix, sorted(found))
        return found.pop() if found else None

    def events(self, *, image_id: str | None = None, url: str | None = None, row_id: int | None = None) -> list[Event]:
        """The chain of one key as a list of events (dicts with the ledger's columns), in the full scan's order."""
        return self._retrying(self._events, image_id, url, row_id) or []

    def chain(self, *, image_id: str | None = None, url: str | None = None, row_id: int | None = None) -> pd.DataFrame:
        """What :meth:`infra.lineage.Ledger.chain` gives (one of the three keys), read through the index."""
        events = self._retrying(self._events, image_id, url, row_id)
        if events is None:  # nothing to look for (an unknown URL): the scan's untyped empty frame
            import pandas as pd

            return pd.DataFrame(columns=LEDGER_SCHEMA.names)
        return pa.Table.from_pylist(events, schema=LEDGER_SCHEMA).to_pandas()

    def _events(self, image_id: str | None, url: str | None, row_id: int | None) -> list[Event] | None:
        images: set[str] = set()
        if image_id is not None:
            images = {image_id}
            keys = image_keys(np.array([image_id], dtype=object))
            first = [e for g in self._groups_at(self._locs("by_image", "image", keys)) for _, e in g.select(set(), images)]
            rows = {int(e["row_id"]) for e in first if e["row_id"] is not None}
        else:
            if url is not None:
                key = url_key(url)
                groups = self._groups_at(self._locs("by_url", "url", [url_hash(url)]))
                found = [e for g in groups for _, e in self._inputs(g, key)]
                rows = {int(e["row_id"]) for e in found if e["row_id"] is not None}
            else:
                rows = {int(row_id)}
            of_rows = [e for g in self._groups_at(self._locs("by_row", "row_id", rows)) for _, e in g.select(rows, set())]
            images = {e["image_id"] for e in of_rows if e["image_id"] is not None}
        return self._collect(rows, images)

    @staticmethod
    def _inputs(group: _Group, key: str) -> list[tuple[tuple[str, int, int], Event]]:
        """The ``input`` events of a row group whose URL has the look-up key ``key``."""
        pairs = enumerate(zip(group.table["reason"].to_pylist(), group.table["url"].to_pylist(), strict=True))
        return [((str(group.path), group.index, i), group._event(i)) for i, (reason, url) in pairs
                if reason == "input" and url is not None and url_key(url) == key]  # fmt: skip

    def _collect(self, rows: set[int], images: set[str]) -> list[Event] | None:
        if not rows and not images:
            return None
        locs = set(self._locs("by_row", "row_id", rows))
        locs |= set(self._locs("by_image", "image", image_keys(np.array(sorted(images), dtype=object))))
        found = [hit for g in self._groups_at(locs) for hit in g.select(rows, images)]
        found.sort(key=lambda hit: (Path(hit[0][0]), hit[0][1], hit[0][2]))  # the full scan's order of files
        return sorted((e for _, e in found), key=event_order)


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


def find_chain(run_dir: Path, text: str) -> tuple[list[Event], str]:
    """The chain of ``text`` (see :func:`parse_key`) and what it is the chain of (an image prefix resolved to the
    whole id). AmbiguousId when a prefix names several images."""
    kind, key = parse_key(text)
    ledger = IndexedLedger(run_dir)
    try:
        if kind == "image":
            image = ledger.resolve_image(str(key))
            return (ledger.events(image_id=image), image) if image else ([], text)
        if kind == "row":
            return ledger.events(row_id=int(key)), f"input row {key}"
        return ledger.events(url=str(key)), text
    finally:
        ledger.close()
