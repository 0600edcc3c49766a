"""The embedded Prefect database is migrated atomically, and one left half-migrated by a killed start is replaced.

The half-migrated state is the one the CI kill test produced (Prefect 3.8.8, as pinned): revision cef24af2ec34
recorded, the next revision's first index already created; every later server start failed on it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from infra.prefect_db import embedded_database_path, ensure_embedded_database, head_revisions, migrate, revision

REPO = Path(__file__).resolve().parents[2]
KILLED_AT = "cef24af2ec34"  # the revision recorded when the CI kill landed
HALF_DONE = "CREATE INDEX ix_block_document__block_type_name_name ON block_document (block_type_name, name)"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(home), PREFECT_LOGGING_LEVEL="ERROR", PYTHONPATH=str(REPO),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")  # 20 s by default: CI's other worker is busy
    return env


@pytest.fixture(scope="module")
def killed_at(tmp_path_factory) -> bytes:
    """A database migrated to KILLED_AT (the whole state in the file), built once for the tests that start there."""
    db = tmp_path_factory.mktemp("killed_at") / "prefect.db"
    ok, err = migrate(db, KILLED_AT)
    assert ok and revision(db) == KILLED_AT, err[-2000:]
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db.read_bytes()


@pytest.fixture
def home(tmp_path):
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    # Defaults restored: other tests' Prefect harnesses set an API URL or a test database in the settings context.
    with temporary_settings(updates={PREFECT_HOME: tmp_path / "home"},
                            restore_defaults={PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL}):  # fmt: skip
        yield tmp_path / "home"


def test_only_the_embedded_sqlite_database_is_managed(home):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    assert embedded_database_path() == home / "prefect.db"
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert embedded_database_path() is None and ensure_embedded_database() is None


def test_fresh_home_gets_a_complete_database_then_is_left_alone(home):
    db = ensure_embedded_database()
    assert db == home / "prefect.db" and revision(db) in head_revisions()
    assert sorted(p.name for p in home.iterdir()) == [".prefect.db.lock", "prefect.db"]  # no temporaries left
    before = db.stat()
    assert ensure_embedded_database() == db
    assert (db.stat().st_ino, db.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_database_behind_head_is_upgraded_on_a_copy_keeping_its_data(home, killed_at):
    home.mkdir()
    db = home / "prefect.db"
    db.write_bytes(killed_at)
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE lvd_probe (v TEXT)")
        con.execute("INSERT INTO lvd_probe VALUES ('kept')")
    assert revision(db) == KILLED_AT
    warnings: list[str] = []
    ensure_embedded_database(warn=warnings.append)
    assert revision(db) in head_revisions() and warnings == []
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT v FROM lvd_probe").fetchall() == [("kept",)]
    assert not list(home.glob("prefect.db.broken-*"))


def test_a_half_migrated_database_is_moved_aside_and_prefect_starts_again(home, killed_at):
    home.mkdir()
    db = home / "prefect.db"
    db.write_bytes(killed_at)
    with sqlite3.connect(db) as con:
        con.execute(HALF_DONE)  # the kill landed inside the next revision (its index committed, no version bump)
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the whole state in the file, so that bytes can be compared
    probe = home / "probe.db"
    probe.write_bytes(db.read_bytes())
    ok, err = migrate(probe)
    assert not ok and "ix_block_document__block_type_name_name already exists" in err  # what every start hit
    broken = db.read_bytes()
    warnings: list[str] = []
    ensure_embedded_database(warn=warnings.append)
    assert revision(db) in head_revisions()
    [aside] = home.glob("prefect.db.broken-*[0-9]")
    assert aside.read_bytes() == broken  # kept for inspection, untouched
    assert len(warnings) == 1 and str(aside) in warnings[0]
    # The embedded server starts on the new database and runs a flow.
    code = "from prefect import flow\n@flow\ndef f():\n    return 7\nassert f() == 7\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], env=_env(home), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_a_file_that_is_not_a_database_is_replaced(home):
    home.mkdir()
    (home / "prefect.db").write_bytes(b"not a database" * 100)
    warnings: list[str] = []
    db = ensure_embedded_database(warn=warnings.append)
    assert revision(db) in head_revisions() and len(warnings) == 1
    assert [p.read_bytes() for p in home.glob("prefect.db.broken-*[0-9]")] == [b"not a database" * 100]
