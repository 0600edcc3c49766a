import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest

# A session writes ~1.3 GB under the temporary folder (runs, shards, checkpoints, Prefect databases). On a nearly
# full disk the flow tests would fail one by one with ENOSPC deep inside Prefect or Lightning (or hang), so the
# session refuses to start instead and says why. LVD_MIN_FREE_GB overrides the floor.
MIN_FREE_GB = float(os.environ.get("LVD_MIN_FREE_GB", "2"))


def free_gb(path: str) -> float:
    return shutil.disk_usage(path).free / 2**30


def pytest_sessionstart(session: pytest.Session) -> None:
    tmp = tempfile.gettempdir()
    if (free := free_gb(tmp)) < MIN_FREE_GB:
        pytest.exit(f"only {free:.2f} GB free under {tmp}; the tests need at least {MIN_FREE_GB:g} GB "
                    f"(free some space, point TMPDIR elsewhere, or set LVD_MIN_FREE_GB)", returncode=3)


@pytest.fixture(scope="session")
def prefect_server(migrated_prefect_db):
    """One temporary Prefect database and API server for every flow test of the session (Prefect's test harness,
    its database a copy of `migrated_prefect_db`: the harness's server would otherwise migrate a new one)."""
    from prefect.testing import utilities

    folder = tempfile.mkdtemp(prefix="lvd-prefect-harness-")  # the harness removes it at exit
    shutil.copyfile(migrated_prefect_db, Path(folder) / "prefect-test.db")  # the file name the harness uses
    mp = pytest.MonkeyPatch()
    mp.setattr(utilities, "mkdtemp", lambda: folder)
    try:
        with utilities.prefect_test_harness(server_startup_timeout=120):
            mp.undo()
            yield
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def migrated_prefect_db(tmp_path_factory) -> Path:
    """An embedded-server database at Prefect's head revision, made once per test session by `lvd`'s own
    `ensure_embedded_database` (locked and atomic, so the pytest-xdist workers share it through their common temporary
    folder): a test that starts `lvd` in a fresh PREFECT_HOME begins from a copy instead of migrating one from
    scratch (~15 s each on 2 idle cores, more under load). Migrating from scratch, and surviving a kill inside it, is
    what tests/infra/test_prefect_db.py tests."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    from infra.prefect_db import ensure_embedded_database

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with temporary_settings(updates={PREFECT_HOME: shared / "prefect-template"},
                            restore_defaults={PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL}):  # fmt: skip
        return ensure_embedded_database()


@pytest.fixture
def prefect_home(migrated_prefect_db):
    """``prefect_home(path)`` makes ``path`` a PREFECT_HOME whose database is a copy of `migrated_prefect_db`."""

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated_prefect_db, path / "prefect.db")
        return path

    return make
