"""The lineage index: which ledger row groups hold the events of a row, an image or a URL, so that a look-up reads a
few row groups instead of every ledger file (see docs/lineage.md).

One SQLite file per stage, ``stages/<stage>/lineage_index.sqlite`` (it goes when the stage's folder is wiped), with
B-tree tables keyed for look-up:

- ``by_row(row_id, loc)``: the row groups holding events of an input row;
- ``by_image(image, loc)``: the same for an image; ``image`` is the id's first 64 bits (:func:`image_keys`), so a
  prefix of an id is a key range, and the events read are then filtered on the whole id;
- ``by_url(url, loc)``: the row groups holding the ``input`` events of a URL, keyed by a 64-bit hash of
  :func:`url_key` (the events read are then filtered on the key itself);
- ``files``: the ledger files indexed, with their size and mtime (``loc`` is ``file id << 20 | row group``).

SQLite (in the standard library) rather than a hand-made format: a B-tree per key gives logarithmic look-ups whatever
the run's size, rows are added per ledger file in transactions (a stage's shards, a retry's new files), several
processes may read while one writes, and nothing is added to the environment. Sorted parquet would need rewriting
(merging) as shards arrive and its footers grow with the run; DuckDB would be a new dependency for what a B-tree does.

The index is derived data and never trusted: :func:`sync` compares it with the ledger folder (its mtime, then each
file's size and mtime) before every use, indexes new files and rebuilds it when a file it names changed or went.
:func:`stage_digest` and :func:`ledger_digest` let ``lvd audit`` compare its whole content with the ledger.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from infra.lineage import ledger_dir, url_key

INDEX_NAME = "lineage_index.sqlite"
FORMAT = "lineage-index-1"
LOC_BITS = 20  # row groups per file: at most 2**20
COMMIT_EVERY = 500_000  # entries per transaction while building (an interrupted build keeps what it committed)
ID_COLUMNS = ["row_id", "image_id", "reason", "url"]  # never `detail`: ids only
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files(id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, bytes INTEGER NOT NULL,
                                 mtime_ns INTEGER NOT NULL, events INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS by_row(row_id INTEGER NOT NULL, loc INTEGER NOT NULL, PRIMARY KEY(row_id, loc)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS by_image(image INTEGER NOT NULL, loc INTEGER NOT NULL, PRIMARY KEY(image, loc)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS by_url(url INTEGER NOT NULL, loc INTEGER NOT NULL, PRIMARY KEY(url, loc)) WITHOUT ROWID;
"""
TABLES = ("by_row", "by_image", "by_url")
_HEX = np.full(128, 16, np.uint64)  # 16: not a lower-case hex digit
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint64)
_URL_PROBE = (" http://Example.COM/a b?c=d ", "http://xn--bcher-kva.example/ä", "\thttps://a.example:443/x#f\n")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def hash64(text: str) -> int:
    """A stable 64-bit hash (blake2b), as SQLite's signed integer."""
    return _signed(int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big"))


def image_keys(ids: np.ndarray) -> np.ndarray:
    """Index keys of image ids (an array of str): the first 16 hex digits as a signed 64-bit integer, so ids sharing
    a prefix are neighbours; ids that do not start with 16 lower-case hex digits are hashed (:func:`hash64`)."""
    heads = np.asarray(ids, dtype="U16").view(np.uint32).reshape(len(ids), 16)  # code points of the first 16 chars
    digits = _HEX[np.minimum(heads, 127)]
    keys = np.zeros(len(ids), np.uint64)
    for i in range(16):
        keys = (keys << np.uint64(4)) | (digits[:, i] & np.uint64(15))
    keys = keys.view(np.int64)
    for i in np.flatnonzero((digits > 15).any(axis=1)):
        keys[i] = hash64(str(ids[i]))
    return keys


def prefix_range(prefix: str) -> tuple[int, int]:
    """The key range of the image ids starting with a lower-case hex ``prefix`` (1 to 64 digits)."""
    head = prefix[:16]
    return _signed(int(head.ljust(16, "0"), 16)), _signed(int(head.ljust(16, "f"), 16))


def url_hash(url: str) -> int:
    return hash64(url_key(url))


def _url_fingerprint() -> str:
    """What :func:`url_key` makes of a few URLs: an index built with another normalisation is stale."""
    return hashlib.sha256("\n".join(url_key(u) for u in _URL_PROBE).encode()).hexdigest()[:16]


def loc_of(file_id: int, row_group: int) -> int:
    return file_id << LOC_BITS | row_group


def split_loc(loc: int) -> tuple[int, int]:
    return loc >> LOC_BITS, loc & ((1 << LOC_BITS) - 1)


def _valid(column: pa.ChunkedArray) -> np.ndarray:
    return np.array(column.drop_null().to_pylist(), dtype=object)  # not to_numpy: strings would import pandas


def row_group_entries(table: pa.Table, loc: int) -> dict[str, list[tuple[int, int]]]:
    """The index entries of one row group of a ledger file (columns ``ID_COLUMNS``)."""
    import pyarrow.compute as pc  # here: look-ups, which import this module, do not need it

    rows = np.unique(_valid(table["row_id"]).astype(np.int64))
    images = np.unique(image_keys(np.unique(_valid(table["image_id"]))))
    inputs = table.filter(pc.and_(pc.equal(table["reason"], "input"), table["url"].is_valid()))
    urls = sorted({url_hash(u) for u in inputs["url"].to_pylist()})
    return {"by_row": [(int(r), loc) for r in rows], "by_image": [(int(i), loc) for i in images],
            "by_url": [(u, loc) for u in urls]}  # fmt: skip


def file_entries(pf: pq.ParquetFile, file_id: int) -> Iterator[dict[str, list[tuple[int, int]]]]:
    for rg in range(pf.num_row_groups):
        yield row_group_entries(pf.read_row_group(rg, columns=ID_COLUMNS), loc_of(file_id, rg))


def connect(stage_dir: Path, fallback: Path | str = ":memory:") -> sqlite3.Connection:
    """The stage's index (created empty if missing); at ``fallback`` (by default in memory, for this process only)
    where the stage folder cannot be written (a read-only copy of a run)."""
    try:
        conn = sqlite3.connect(Path(stage_dir) / INDEX_NAME, timeout=120, isolation_level=None)
        conn.executescript(SCHEMA)
    except sqlite3.OperationalError:  # read-only folder or file
        conn = sqlite3.connect(fallback, isolation_level=None)
        conn.executescript(SCHEMA)
    conn.execute("PRAGMA cache_size=-65536")  # 64 MiB at most, whatever the run's size
    return conn


def _meta(conn: sqlite3.Connection, key: str) -> object:
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else row[0]


def _set_meta(conn: sqlite3.Connection, **values: object) -> None:
    conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())


def database_path(conn: sqlite3.Connection) -> str:
    """The file behind a connection ("" in memory): what another connection ATTACHes."""
    return next(row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main")


def file_ids(conn: sqlite3.Connection) -> dict[str, int]:
    return {name: fid for fid, name in conn.execute("SELECT id, name FROM files")}


def _is_current(conn: sqlite3.Connection, mtime_ns: int) -> bool:
    return (_meta(conn, "ledger_mtime_ns") == mtime_ns and _meta(conn, "format") == FORMAT
            and _meta(conn, "url_key") == _url_fingerprint())  # fmt: skip


def ledger_listing(ledger: Path) -> dict[str, os.stat_result]:
    with os.scandir(ledger) as it:
        return {e.name: e.stat() for e in it if e.name.endswith(".parquet") and not e.name.startswith(".")}


def sync(conn: sqlite3.Connection, stage_dir: Path, *, force: bool = False) -> int:
    """Bring the stage's index up to date with its ledger folder; returns the number of files (re)indexed.

    Unchanged folder (same mtime): nothing is read. New files are indexed; a file that changed or went (or an index
    of another format) empties the index, which is then rebuilt from every file."""
    ledger = ledger_dir(stage_dir)
    mtime = ledger.stat().st_mtime_ns  # taken before listing: a file added meanwhile leaves the index behind, not wrong
    if not force and _is_current(conn, mtime):
        return 0
    conn.execute("BEGIN IMMEDIATE")  # one writer at a time; others wait (timeout) and then find the work done
    try:
        if not force and _is_current(conn, mtime):
            conn.execute("COMMIT")
            return 0
        n = _update(conn, ledger, force)
        _set_meta(conn, ledger_mtime_ns=mtime, format=FORMAT, url_key=_url_fingerprint())
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return n


def _update(conn: sqlite3.Connection, ledger: Path, force: bool) -> int:
    listing = ledger_listing(ledger)
    known = {name: (fid, size, mtime) for fid, name, size, mtime in
             conn.execute("SELECT id, name, bytes, mtime_ns FROM files")}  # fmt: skip
    changed = any(name not in listing or (listing[name].st_size, listing[name].st_mtime_ns) != (size, mtime)
                  for name, (_, size, mtime) in known.items())  # fmt: skip
    if force or changed or _meta(conn, "format") != FORMAT or _meta(conn, "url_key") != _url_fingerprint():
        for table in ("files", *TABLES):
            conn.execute(f"DELETE FROM {table}")
        known = {}
    pending = 0
    new = sorted(set(listing) - set(known))
    for name in new:
        if conn.execute("SELECT 1 FROM files WHERE name=?", (name,)).fetchone():
            continue  # indexed by another process while this one waited between its commits
        st = listing[name]
        cur = conn.execute("INSERT INTO files(name, bytes, mtime_ns, events) VALUES (?, ?, ?, 0)",
                           (name, st.st_size, st.st_mtime_ns))  # fmt: skip
        pending += _index_file(conn, ledger / name, cur.lastrowid)
        if pending >= COMMIT_EVERY:  # keep what is done if the build is interrupted
            conn.execute("COMMIT")
            conn.execute("BEGIN IMMEDIATE")
            pending = 0
    return len(new)


def _index_file(conn: sqlite3.Connection, path: Path, file_id: int) -> int:
    n = 0
    pf = pq.ParquetFile(path)
    for entries in file_entries(pf, file_id):
        for table, rows in entries.items():
            conn.executemany(f"INSERT INTO {table} VALUES (?, ?)", rows)
            n += len(rows)
    conn.execute("UPDATE files SET events=? WHERE id=?", (pf.metadata.num_rows, file_id))
    return n


def index_stage(stage_dir: Path) -> int:
    """Index a stage's ledger (the stage-completion hook); files indexed before are not read again."""
    if not ledger_dir(stage_dir).is_dir():
        return 0
    conn = connect(stage_dir)
    try:
        return sync(conn, stage_dir)
    finally:
        conn.close()


# Digests of the index's content, compared by `lvd audit` with the same digests computed from the ledger: a count and
# two sums of a per-entry mix modulo a prime (order-free, so both sides stream in any order; SQLite integers never
# overflow here: every product stays below 2**62).
_P, _K1, _K2 = 2_147_483_629, 1_103_515_245, 1_664_525


def _mix_sql(a: str, b: str) -> str:
    h = f"(((({a} % {_P}) + {_P}) % {_P}) * {_K1} + ((({b} % {_P}) + {_P}) % {_P}) * {_K2}) % {_P}"
    return f"count(*), coalesce(sum({h}), 0), coalesce(sum(({h}) * ({h}) % {_P}), 0)"


def stage_digest(conn: sqlite3.Connection) -> dict[str, tuple[int, int, int]]:
    cols = {"by_row": ("row_id", "loc"), "by_image": ("image", "loc"), "by_url": ("url", "loc")}
    return {t: tuple(conn.execute(f"SELECT {_mix_sql(*cols[t])} FROM {t}").fetchone()) for t in TABLES}


def _mix(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int]:
    a, b = np.mod(a.astype(np.int64), _P), np.mod(b.astype(np.int64), _P)
    h = (a * _K1 + b * _K2) % _P
    return len(h), int(h.sum()), int((h * h % _P).sum())


class LedgerDigest:
    """The digest :func:`stage_digest` gives for an index of the row groups added (the ledger side of the check)."""

    def __init__(self) -> None:
        self.total = {t: [0, 0, 0] for t in TABLES}

    def add(self, table: pa.Table, loc: int) -> None:
        """One row group's events (at least ``ID_COLUMNS``) at ``loc``."""
        for name, rows in row_group_entries(table, loc).items():
            pairs = np.array(rows, dtype=np.int64).reshape(-1, 2)
            for i, v in enumerate(_mix(pairs[:, 0], pairs[:, 1])):
                self.total[name][i] += v

    def value(self) -> dict[str, tuple[int, int, int]]:
        return {t: tuple(v) for t, v in self.total.items()}
