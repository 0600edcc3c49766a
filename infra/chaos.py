"""Crash-and-resume trials: SIGKILL the whole `lvd` process tree at chosen points, resume, compare with a reference.

Used by `bench/chaos.py` (20 random trials) and by the CI test that kills one run three times.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from infra.audit import audit_run
from infra.lineage import Ledger
from infra.run import RunDir
from infra.shards import iter_tar, list_shards

REPO = Path(__file__).resolve().parents[1]
DEMO_ORIGIN = r"(127\.0\.0\.1|\[::1\]):\d+"

# The flow's report and evaluation are not part of the comparison; they are switched off to keep trials short
# unless the caller overrides them back on.
DEFAULT_OVERRIDES = ["evaluate.enabled=false"]


@dataclass
class Snapshot:
    corpus: list[tuple[str, str]]  # (image id, sha256 of the stored bytes), in shard order
    ledger: str  # digest of the canonical ledger: every event, sorted
    n_events: int

    def same_as(self, other: Snapshot) -> bool:
        return self.corpus == other.corpus and self.ledger == other.ledger


def snapshot(run_dir: Path) -> Snapshot:
    corpus = [(key, hashlib.sha256(data).hexdigest())
              for shard in list_shards(run_dir / "stages" / "corpus" / "shards") for key, _ext, data in iter_tar(shard.tar)]
    events = Ledger(run_dir).events().astype(str)
    # The demo crawl is served on a free port chosen per run: the only legitimate difference between two runs.
    events = events.replace(DEMO_ORIGIN, r"\1:PORT", regex=True)
    canonical = events.sort_values(list(events.columns)).to_csv(index=False)
    return Snapshot(corpus, hashlib.sha256(canonical.encode()).hexdigest(), len(events))


def lvd(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """`lvd ...` in its own session, so that the whole process tree can be killed at once."""
    return subprocess.Popen([sys.executable, "-m", "infra.cli", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_tree(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_id_of(root: Path) -> str:
    runs = [p.name for p in root.iterdir() if (p / "config.yaml").is_file()]
    if len(runs) != 1:
        raise RuntimeError(f"expected one run under {root}, found {runs}")
    return runs[0]


def environment(prefect_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="ERROR", NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(REPO))
    env.pop("PREFECT_API_URL", None)  # each process runs its own embedded server (SQLite under PREFECT_HOME)
    return env


def reference(config: Path, overrides: list[str], root: Path, env: dict[str, str]) -> tuple[Snapshot, float]:
    t0 = time.perf_counter()
    proc = lvd("run", str(config), f"run.root={root}", *overrides, env=env)
    if proc.wait() != 0:
        raise RuntimeError(f"the reference run failed (exit {proc.returncode}); run it by hand to see why")
    return snapshot(root / run_id_of(root)), time.perf_counter() - t0


def in_progress(root: Path) -> str:
    """The stage that was running (started, not finished) per the run's event log; 'start-up' if none yet."""
    runs = [p for p in root.iterdir() if (p / "events.jsonl").is_file()] if root.is_dir() else []
    if not runs:
        return "start-up"
    running = "between stages"
    for event in RunDir(root, runs[0].name).events():
        if event.get("event") == "started":
            running = event["stage"]
        elif event.get("event") in ("completed", "failed", "skipped"):
            running = "between stages"
    return running


@dataclass
class TrialResult:
    snapshot: Snapshot
    problems: list[str]  # what `lvd audit` found
    killed_in: list[str]  # per kill: the stage it interrupted, or "finished" when the flow was already done
    finished_after: float | None = None  # seconds the first process took when it ended before its kill


def trial(config: Path, overrides: list[str], root: Path, env: dict[str, str], delays: list[float],
          timeout: float) -> TrialResult:
    """Start the run; after each delay, SIGKILL the process tree and resume; finally resume to the end."""
    killed_in: list[str] = []
    finished_after = None
    started = time.perf_counter()
    proc = lvd("run", str(config), f"run.root={root}", *overrides, env=env)
    for delay in delays:
        try:
            proc.wait(timeout=delay)
            killed_in.append("finished")
            if finished_after is None and len(killed_in) == 1:
                finished_after = time.perf_counter() - started
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            killed_in.append(in_progress(root))
        if root.is_dir() and any((p / "config.yaml").is_file() for p in root.iterdir()):
            proc = lvd("resume", run_id_of(root), "--root", str(root), env=env)
        else:  # killed before the run directory existed: the same command again (same config, same run id)
            proc = lvd("run", str(config), f"run.root={root}", *overrides, env=env)
    if proc.wait(timeout=timeout) != 0:
        raise RuntimeError(f"the final resume under {root} failed (exit {proc.returncode})")
    run_dir = root / run_id_of(root)
    audit = audit_run(RunDir(root, run_dir.name))
    return TrialResult(snapshot(run_dir), [f"[{c}] {m}" for c, m in audit.problems], killed_in, finished_after)
