"""The ledger side of `lvd audit`, streamed: each ledger row group is read once, its facts go into a scratch SQLite
database on disk (and into the lineage index's digest), and the checks are SQL queries over it. Python's memory
holds one row group at a time, SQLite's cache is bounded, so memory stays flat whatever the run's size; the scratch
file grows with the run (about 60 bytes per event with an outcome, in a temporary folder removed afterwards).

Scratch tables: ``inputs`` (``input`` events: row, whether it names a URL, whether ingest wrote it), ``retries``
(ingest retries: row, attempt), ``terminal`` (every drop and keep), ``keeps`` (keep events with the sha256 they
recorded) and ``stored`` (what the corpus shards hold, filled by :mod:`infra.audit`). ``current`` is ``terminal``
without the ingest events that a later attempt of their row superseded (see :mod:`infra.lineage`); ``recorded``
the sha256 of each kept image's last keep event.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.lineage import LEDGER_SCHEMA, ledger_dir
from infra.lineage_index import (
    ID_COLUMNS,
    LedgerDigest,
    connect,
    database_path,
    file_ids,
    image_keys,
    ledger_listing,
    loc_of,
    stage_digest,
    sync,
)

SCAN_COLUMNS = sorted({*ID_COLUMNS, "source", "stage", "kind", "attempt"})
SCHEMA = """
CREATE TABLE inputs(row_id INTEGER, has_url INTEGER, ingest INTEGER);
CREATE TABLE retries(row_id INTEGER, attempt INTEGER);
CREATE TABLE terminal(row_id INTEGER, stage TEXT, kind TEXT, reason TEXT, attempt INTEGER);
CREATE TABLE keeps(seq INTEGER PRIMARY KEY, image TEXT, key INTEGER, row_id INTEGER, source TEXT, sha TEXT);
CREATE TABLE stored(seq INTEGER PRIMARY KEY, image TEXT, shard TEXT, sha TEXT);
"""
DERIVED = """
CREATE INDEX inputs_row ON inputs(row_id);
CREATE TABLE latest(row_id INTEGER PRIMARY KEY, attempt INTEGER);
INSERT INTO latest SELECT row_id, max(attempt) FROM retries GROUP BY row_id;
CREATE TABLE current AS SELECT t.* FROM terminal t LEFT JOIN latest l ON t.row_id = l.row_id
    WHERE NOT (t.stage = 'ingest' AND t.row_id IS NOT NULL AND t.attempt < coalesce(l.attempt, 0));
CREATE INDEX current_row ON current(row_id);
CREATE INDEX keeps_image ON keeps(image);
CREATE INDEX stored_image ON stored(image);
CREATE TABLE recorded(image TEXT PRIMARY KEY, sha TEXT);
INSERT OR REPLACE INTO recorded SELECT image, sha FROM keeps ORDER BY seq;
"""


def scratch(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-65536;" + SCHEMA)
    return conn


def _rows(table: pa.Table, mask: pa.ChunkedArray | pa.Array, columns: list[str]) -> Iterator[tuple]:
    picked = table.filter(pc.fill_null(mask, False))
    return zip(*(picked[c].to_pylist() for c in columns), strict=True)


def _facts(db: sqlite3.Connection, table: pa.Table, detail: pa.ChunkedArray | None) -> None:
    """One row group's facts into the scratch tables."""
    ingest, reason, kind = pc.equal(table["stage"], "ingest"), table["reason"], table["kind"]
    table = table.set_column(table.schema.get_field_index("attempt"), "attempt",
                             pc.fill_null(table["attempt"], 0))  # fmt: skip  (null: written before retries existed)
    inputs = table.filter(pc.fill_null(pc.equal(reason, "input"), False))
    has_url = pc.fill_null(pc.greater(pc.utf8_length(inputs["url"]), 0), False)
    db.executemany("INSERT INTO inputs VALUES (?, ?, ?)",
                   zip(inputs["row_id"].to_pylist(), has_url.to_pylist(),
                       pc.equal(inputs["stage"], "ingest").to_pylist(), strict=True))  # fmt: skip
    db.executemany("INSERT INTO retries VALUES (?, ?)",
                   _rows(table, pc.and_(ingest, pc.equal(reason, "retry")), ["row_id", "attempt"]))  # fmt: skip
    terminal = pc.is_in(kind, pa.array(["drop", "keep"]))
    db.executemany("INSERT INTO terminal VALUES (?, ?, ?, ?, ?)",
                   _rows(table, terminal, ["row_id", "stage", "kind", "reason", "attempt"]))  # fmt: skip
    keep = pc.fill_null(pc.equal(kind, "keep"), False)
    if detail is not None and pc.any(keep).as_py():
        kept = table.filter(keep)
        shas = [(json.loads(d) if d else {}).get("sha256") for d in pc.filter(detail, keep).to_pylist()]
        ids = kept["image_id"].to_pylist()
        keys = image_keys(np.array([i or "" for i in ids], dtype=object)).tolist()
        db.executemany("INSERT INTO keeps(image, key, row_id, source, sha) VALUES (?, ?, ?, ?, ?)",
                       zip(ids, keys, kept["row_id"].to_pylist(), kept["source"].to_pylist(), shas, strict=True))


class LedgerScan:
    """One pass over every ledger file of a run: scratch facts, and each stage's index checked against it."""

    def __init__(self, run_dir: Path, db: sqlite3.Connection, work: Path):
        self.run_dir, self.db, self.work = Path(run_dir), db, Path(work)
        root = self.run_dir / "stages"
        self.stages = sorted(d for d in root.iterdir() if ledger_dir(d).is_dir()) if root.is_dir() else []
        self.notes: list[str] = []
        self.files = 0

    def run(self) -> None:
        for stage_dir in self.stages:
            self._stage(stage_dir)
        self.db.executescript(DERIVED)
        self.attach()

    def attach(self) -> None:
        """Each stage's (checked) index, as schema ``s_<stage>`` of the scratch database."""
        for stage_dir in self.stages:
            conn = connect(stage_dir, fallback=self.work / f"{stage_dir.name}.sqlite")
            path = database_path(conn)
            conn.close()
            self.db.execute("ATTACH DATABASE ? AS ?", (path, f"s_{stage_dir.name}"))

    def _stage(self, stage_dir: Path) -> None:
        name = stage_dir.name
        conn = connect(stage_dir, fallback=self.work / f"{name}.sqlite")
        try:
            behind = sync(conn, stage_dir)
            if behind:
                self.notes.append(f"lineage index of stage {name}: {behind} ledger files indexed (it was missing or "
                                  "behind its ledger)")
            ids = file_ids(conn)
            digest = LedgerDigest()
            for file in sorted(ledger_listing(ledger_dir(stage_dir))):
                self._file(ledger_dir(stage_dir) / file, ids.get(file, -1), digest)
            if digest.value() != stage_digest(conn) or set(ids) != set(ledger_listing(ledger_dir(stage_dir))):
                sync(conn, stage_dir, force=True)
                self.notes.append(f"lineage index of stage {name}: disagreed with its ledger (a file changed after it "
                                  "was indexed); rebuilt")
        finally:
            conn.close()

    def _file(self, path: Path, file_id: int, digest: LedgerDigest) -> None:
        pf = pq.ParquetFile(path)
        self.files += 1
        self.db.execute("BEGIN")
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=[c for c in SCAN_COLUMNS if c in pf.schema_arrow.names])
            for c in SCAN_COLUMNS:  # files from before a column existed
                if c not in table.column_names:
                    table = table.append_column(c, pa.nulls(table.num_rows, LEDGER_SCHEMA.field(c).type))
            digest.add(table, loc_of(file_id, rg))
            has_keep = pc.any(pc.equal(table["kind"], "keep")).as_py()
            detail = pf.read_row_group(rg, columns=["detail"])["detail"] if has_keep else None  # keeps' sha256 only
            _facts(self.db, table, detail)
        self.db.execute("COMMIT")
