"""The Prefect API server going away: Prefect's flush of its queued events retries each one against the dead server
(~7-10 s each) without a time limit; `lvd` bounds the time from the end of the flow's work to the exit
(`flows.cli.running.ExitWatchdog`, LVD_PREFECT_EXIT_TIMEOUT) and says why. The whole `lvd run` against a server killed
mid-run is `bench/prefect_outage.py`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("prefect_outage_child.py")
pytestmark = pytest.mark.slow


def launch(mode: str, tmp_path: Path, prefect_home) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(prefect_home(tmp_path / mode)),
           "LVD_PREFECT_EXIT_TIMEOUT": "3", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen([sys.executable, str(CHILD), mode, "5", str(tmp_path / mode / "runs")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def server_stopped(proc: subprocess.Popen) -> float:
    """Wait for the child's server to stop; the time it did."""
    line = proc.stdout.readline()
    assert line == "server stopped\n", line + proc.stderr.read()[-3000:]
    return time.monotonic()


def test_prefect_exit_flush_against_a_dead_server_is_bounded(tmp_path, prefect_home):
    """Two children side by side (each starts its own server): one exits through the bound, the other (the control)
    shows that what `lvd` guards against still happens in this Prefect version."""
    bounded, plain = launch("bounded", tmp_path, prefect_home), launch("plain", tmp_path, prefect_home)
    try:
        stopped = server_stopped(bounded)
        _, err = bounded.communicate(timeout=120)
        waited = time.monotonic() - stopped
        assert bounded.returncode == 1  # Prefect has not returned the final state: not a success
        assert ("lvd: the flow completed its stages 3 s ago, but Prefect has not finished recording the run at its API "
                "http://127.0.0.1:") in err
        assert ("(is the server down?); exiting with status 1 without waiting for its retries (LVD_PREFECT_EXIT_TIMEOUT). "
                "The run directory holds the run's own record; once the server is back, `lvd resume outage` records "
                "the run in Prefect (completed stages are cache hits).") in err
        assert 2.5 <= waited < 3.0 + 10.0  # the timeout (less pipe latency), plus the 0.5 s poll and a loaded machine

        stopped = server_stopped(plain)
        with pytest.raises(subprocess.TimeoutExpired):  # 5 events at ~10 s each: still flushing after 13 s
            plain.wait(timeout=max(0.0, stopped + 3.0 + 10.0 - time.monotonic()))
    finally:
        for proc in (bounded, plain):
            proc.kill()
            proc.communicate()
