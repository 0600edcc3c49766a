"""Secrets in the environment of a run (a remote Prefect server's API key, storage credentials) never reach the run
directory (config, events, manifests, ledgers, shards, Prefect results, report) nor the command's output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "PREFECT_API_KEY": "pnu_lvdTestSecret0123456789abcdefXYZ",
    "AWS_ACCESS_KEY_ID": "AKIALVDTEST000000042",
    "AWS_SECRET_ACCESS_KEY": "lvdTestAwsSecret/0123456789+abcdefXYZ",
}
pytestmark = pytest.mark.slow


def texts(path: Path) -> list[bytes]:
    """The file's bytes, and for a parquet file also its decoded table (its pages may be compressed)."""
    out = [path.read_bytes()]
    if path.suffix == ".parquet":
        out.append(pd.read_parquet(path).to_csv(index=False).encode())
    return out


def test_environment_secrets_never_reach_the_run_directory_or_the_output(tmp_path, prefect_home):
    root = tmp_path / "runs"
    env = {**os.environ, **SECRETS, "PREFECT_HOME": str(prefect_home(tmp_path / "prefect-home")),
           "PYTHONPATH": str(REPO), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    env.pop("PREFECT_API_URL", None)  # the run's own embedded server
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(REPO / "configs" / "tiny.yaml"),
                           f"run.root={root}", "run.stop_after=ingest"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (run_dir,) = root.iterdir()
    files = sorted(p for p in run_dir.rglob("*") if p.is_file())
    names = {str(p.relative_to(run_dir)) for p in files}
    assert {"config.yaml", "events.jsonl", "run.json", "report.html", "stages/crawl/manifest.json",
            "stages/ingest/manifest.json"} <= names
    assert any(n.startswith("stages/ingest/ledger/") for n in names)
    assert any(n.startswith(".prefect-results/") for n in names)
    for path in (run_dir / "config.yaml", run_dir / "events.jsonl", run_dir / "report.html"):
        assert run_dir.name.encode() in path.read_bytes()  # the scan below does read what the run wrote
    leaks = [(str(p.relative_to(run_dir)), name) for p in files for text in texts(p)
             for name, value in SECRETS.items() if value.encode() in text]
    assert leaks == []
    assert [name for name, value in SECRETS.items() if value in proc.stdout + proc.stderr] == []
