"""The embedded Prefect server's SQLite database, migrated atomically before a flow starts.

Prefect migrates its database when the embedded server starts, one alembic revision at a time, and on SQLite a
revision is not atomic. A process killed during that window (SIGKILL, pre-emption; on a fresh ``PREFECT_HOME`` it
lasts seconds) leaves a database that every later start fails on ("index ... already exists", then "Timed out while
attempting to connect to ephemeral Prefect API server"), and with it every ``lvd resume``: found by the CI kill test.

`ensure_embedded_database` runs before each CLI flow. When the database is missing or behind Prefect's head
revision, it migrates a copy in a child process and renames the copy into place, so the file Prefect opens is either
the old one or a complete one. A database that cannot be migrated (left half-migrated by an earlier, non-atomic
start) is moved aside as ``prefect.db.broken-<time>`` and a fresh one is created, with a warning: Prefect's run
history is lost, the runs are not (their state, cache and lineage live in the run directories). Servers given by
``PREFECT_API_URL`` and non-SQLite databases are left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from infra.storage import commit

# What Prefect's server runs at start-up (`PrefectDBInterface.create_db`: alembic upgrade in a worker thread, which its
# migration environment needs), to a given revision.
_MIGRATE = ("import asyncio, sys\n"
            "from prefect.server.database.alembic_commands import alembic_upgrade\n"
            "from prefect.utilities.asyncutils import run_sync_in_worker_thread\n"
            "asyncio.run(run_sync_in_worker_thread(alembic_upgrade, sys.argv[1]))\n")  # fmt: skip
_SIDE = ("-wal", "-shm", "-journal")


def embedded_database_path() -> Path | None:
    """The SQLite file of the embedded server, or None (a remote API, or another database)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return None
    url = settings.server.database.connection_url
    url = url.get_secret_value() if url is not None else f"sqlite+aiosqlite:///{settings.home}/prefect.db"
    if not url.startswith("sqlite") or ":memory:" in url or ":///" not in url:
        return None
    return Path(url.split(":///", 1)[1].split("?", 1)[0]).expanduser()


def head_revisions() -> set[str]:
    """Prefect's head revision(s) for SQLite, from its migration scripts."""
    import prefect.server.database as database
    from alembic.script import ScriptDirectory
    from prefect.server.database.alembic_commands import alembic_config

    cfg = alembic_config()
    cfg.set_main_option("version_locations", str(Path(database.__file__).parent / "_migrations" / "versions" / "sqlite"))
    return set(ScriptDirectory.from_config(cfg).get_heads())


def revision(path: Path) -> str | None:
    """The alembic revision recorded in a database file (None: no file, not a database, or never migrated)."""
    if not path.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.DatabaseError:
        return None
    return row[0] if row else None


def migrate(path: Path, to: str = "head", timeout: float = 600) -> tuple[bool, str]:
    """Create or upgrade the database at ``path`` to revision ``to`` (Prefect's head by default) in a child process:
    (succeeded, its stderr)."""
    url = f"sqlite+aiosqlite:///{path}"
    env = dict(os.environ, PREFECT_API_DATABASE_CONNECTION_URL=url, PREFECT_SERVER_DATABASE_CONNECTION_URL=url)
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", _MIGRATE, to], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 0:
        with contextlib.closing(sqlite3.connect(path)) as con:  # fold the WAL into the file before it is renamed
            con.execute("PRAGMA journal_mode=DELETE")  # (Prefect's connections switch it back to WAL)
    return proc.returncode == 0, proc.stderr


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(f".{path.name}.lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    for p in [path, *(Path(f"{path}{s}") for s in _SIDE)]:
        p.unlink(missing_ok=True)


def _copy(src: Path, dst: Path) -> bool:
    """A consistent copy of a SQLite database (its WAL included); False when it cannot be read as one."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{src}?mode=ro", uri=True)) as a, \
                contextlib.closing(sqlite3.connect(dst)) as b:  # fmt: skip
            a.backup(b)
        return True
    except sqlite3.DatabaseError:
        return False


def ensure_embedded_database(warn=lambda message: print(message, file=sys.stderr)) -> Path | None:
    """Make the embedded server's database complete at Prefect's head revision before the server opens it (module
    docstring); returns its path, or None when there is nothing to manage."""
    path = embedded_database_path()
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        heads = head_revisions()
        if revision(path) in heads:
            return path  # the common case: one read-only query
        for stale in path.parent.glob(f".{path.name}.migrating-*"):  # from a migration that was itself killed
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.migrating-{os.getpid()}")
        ok, err = (False, "")
        if path.exists():
            if _copy(path, tmp):
                ok, err = migrate(tmp)
            if not ok:
                aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
                for s in ("", *_SIDE):
                    if Path(f"{path}{s}").exists():
                        os.replace(f"{path}{s}", f"{aside}{s}")
                warn(f"warning: the Prefect database {path} could not be migrated (a server start was probably killed "
                     f"while migrating it); moved it to {aside} and created a new one. Prefect's run history starts "
                     "over; the runs' own state (run directories) is unaffected.")  # fmt: skip
                _remove(tmp)
        if not ok:
            ok, err = migrate(tmp)
        if not ok or revision(tmp) not in heads:
            _remove(tmp)
            raise RuntimeError(f"could not create the Prefect database at {path}:\n{err[-2000:]}")
        for s in _SIDE:  # a stale WAL next to the new file would be replayed into it
            Path(f"{path}{s}").unlink(missing_ok=True)
        commit(tmp, path)
        _remove(tmp)  # its side files, if any
    return path
