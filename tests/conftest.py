import os
import shutil
import tempfile

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
def prefect_server():
    """One temporary Prefect database and API server for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
