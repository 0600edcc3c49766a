"""Secrets in the environment of a run (a remote Prefect server's API key, storage credentials) never reach the run
directory (config, events, manifests, ledgers, shards, Prefect results, report) nor the command's output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from infra.cpus import cpu_budget
from infra.memory import memory_budget

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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, migrated_prefect_db) -> tuple[Path, subprocess.CompletedProcess]:
    """`lvd run configs/tiny.yaml run.stop_after=ingest` as a user starts it, its output a pipe (not a terminal)."""
    tmp_path = tmp_path_factory.mktemp("secrets")
    root, home = tmp_path / "runs", tmp_path / "prefect-home"
    home.mkdir()
    shutil.copyfile(migrated_prefect_db, home / "prefect.db")
    env = {**os.environ, **SECRETS, "PREFECT_HOME": str(home), "PYTHONPATH": str(REPO),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "LVD_PROGRESS_INTERVAL": "30"}
    for name in ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL", "LVD_CONSOLE"):
        env.pop(name, None)  # the run's own embedded server; the console as a user gets it
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(REPO / "configs" / "tiny.yaml"),
                           f"run.root={root}", "run.stop_after=ingest"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, proc


def test_the_console_shows_one_line_per_event_and_progress_when_not_on_a_terminal(tiny_run):
    root, proc = tiny_run
    (run_dir,) = root.iterdir()
    n = len(list((run_dir / "stages" / "ingest" / "shards").glob("*.tar")))
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in proc.stderr.splitlines()]
    assert len(lines) == len(set(lines)), proc.stderr  # no line twice (two handlers, a library's own print)
    # Durations as D, rates as R: the rest is exact. Plain lines: the first shard, one every 30 s, the end.
    shown = [re.sub(r"\d+:\d\d:\d\d", "D", re.sub(r"[\d.,]+ URLs/s", "R URLs/s", line)) for line in lines]
    shown = [re.sub(r", peak memory \d+\.\d GiB$", ", peak memory M", line) for line in shown]
    periodic = [s for s in shown[5:-3] if re.fullmatch(rf"INFO    ingest: [2-{n - 1}]/{n} shards, R URLs/s, ETA D", s)]
    assert shown == [f"INFO    using {cpu_budget().describe()} and {memory_budget().describe()}", "INFO    crawl: started",
                     "INFO    crawl: completed in D, rows 323, peak memory M", "INFO    ingest: started",
                     f"INFO    ingest: 1/{n} shards, R URLs/s, ETA D", *periodic,
                     f"INFO    ingest: {n}/{n} shards (323 URLs) in D, R URLs/s",
                     "INFO    ingest: completed in D, kept 286, dropped 37, peak memory M",
                     f"INFO    report: {run_dir / 'report.html'}"], proc.stderr
    assert proc.stdout.startswith(f"run {run_dir.name} in {run_dir}\n")


def test_environment_secrets_never_reach_the_run_directory_or_the_output(tiny_run):
    root, proc = tiny_run
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
