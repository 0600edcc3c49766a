"""Crash-and-resume trials: SIGKILL the whole `lvd` process tree (or Ctrl-C it) at chosen points, resume, compare
with a reference.

Used by `bench/chaos.py` (20 random trials) and by the CI test that kills one run twice.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from infra.audit import audit_run
from infra.history import attempts_from
from infra.lineage import Ledger
from infra.reaper import alive as alive_process
from infra.run import RunDir
from infra.shards import iter_tar, list_shards

REPO = Path(__file__).resolve().parents[1]
DEMO_ORIGIN = r"(127\.0\.0\.1|\[::1\]):\d+"

# Evaluation is not part of the comparison; it is switched off to keep trials short unless the caller overrides it
# back on. Pretraining runs 40 steps with a checkpoint every 2 (the tiny config: 10 steps, one checkpoint every 3750),
# so that a kill inside pretraining resumes from a checkpoint, mid-epoch, as a preempted job does.
DEFAULT_OVERRIDES = ["evaluate.enabled=false", "train.max_steps=40", "train.checkpoint_every=2"]
TRAIN_TOLERANCE = 1e-6  # resumed training continues the trajectory exactly, up to float reduction order
TRAIN_KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "lr")


@dataclass
class Snapshot:
    corpus: list[tuple[str, str]]  # (image id, sha256 of the stored bytes), in shard order
    ledger: str  # digest of the canonical ledger: every event, sorted
    n_events: int
    train: list[tuple[float, ...]]  # per pretraining step (metrics.csv): (step, *TRAIN_KEYS); empty without pretraining

    def same_as(self, other: Snapshot) -> bool:
        return self.corpus == other.corpus and self.ledger == other.ledger and self.same_training(other)

    def same_training(self, other: Snapshot) -> bool:
        """Every step once, in order, with the same loss terms and learning rate (a lost or duplicated step fails)."""
        return [r[0] for r in self.train] == [r[0] for r in other.train] and all(
            abs(a - b) <= TRAIN_TOLERANCE for ra, rb in zip(self.train, other.train, strict=True)
            for a, b in zip(ra[1:], rb[1:], strict=True))


def snapshot(run_dir: Path) -> Snapshot:
    corpus = [(key, hashlib.sha256(data).hexdigest())
              for shard in list_shards(run_dir / "stages" / "corpus" / "shards") for key, _ext, data in iter_tar(shard.tar)]
    events = Ledger(run_dir).events().astype(str)
    # The demo crawl is served on a free port chosen per run: the only legitimate difference between two runs.
    events = events.replace(DEMO_ORIGIN, r"\1:PORT", regex=True)
    canonical = events.sort_values(list(events.columns)).to_csv(index=False)
    metrics = run_dir / "stages" / "pretrain" / "metrics.csv"
    train = []
    if metrics.is_file():
        with open(metrics, newline="") as f:
            train = [(int(r["step"]), *(float(r[k]) for k in TRAIN_KEYS)) for r in csv.DictReader(f)]
    return Snapshot(corpus, hashlib.sha256(canonical.encode()).hexdigest(), len(events), train)


def lvd(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """`lvd ...` in its own session, so that the whole process tree can be killed at once."""
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_tree(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass(frozen=True)
class Kill:
    """How a trial stops a process: SIGKILL to the whole process group (a lost node, a job's cgroup killed) or to the
    `lvd` process alone (`group=False`: what the out-of-memory killer or `kill -9 PID` does; its reaper then stops
    what it started and records the end), or SIGINT the way a terminal's Ctrl-C sends it (to the process group) or
    to the `lvd` process alone, `times` times."""

    signum: int = signal.SIGKILL
    group: bool = True
    times: int = 1


SIGINT_GRACE_S = 60.0  # how long an interrupted `lvd` may take to stop before the trial calls it a hang
REAPER_WAIT_S = 15.0  # how long what `lvd` started may outlive a SIGKILL of it alone (its reaper: 1 s look, 5 s grace)


def stop(proc: subprocess.Popen, kill: Kill) -> tuple[int, float, int]:
    """Send `kill`; return the process's exit status, the seconds it took to exit, and how many of its descendants
    outlived it (SIGKILL to the group: the tree is gone; to `lvd` alone: those alive after its reaper's grace)."""
    import psutil

    t0 = time.monotonic()
    if kill.signum == signal.SIGKILL and kill.group:
        kill_tree(proc)
        return proc.returncode, time.monotonic() - t0, 0
    family = []
    with contextlib.suppress(psutil.Error):
        family = psutil.Process(proc.pid).children(recursive=True)
    if kill.signum == signal.SIGKILL:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        elapsed = time.monotonic() - t0
        _, alive = psutil.wait_procs(family, timeout=REAPER_WAIT_S)
        return proc.returncode, elapsed, sum(alive_process(p) for p in alive)
    for _ in range(kill.times):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, kill.signum) if kill.group else os.kill(proc.pid, kill.signum)
        time.sleep(0.05)
    try:
        proc.wait(timeout=SIGINT_GRACE_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise RuntimeError(f"lvd did not stop within {SIGINT_GRACE_S:g} s of {kill}") from None
    elapsed = time.monotonic() - t0
    _, alive = psutil.wait_procs(family, timeout=REAPER_WAIT_S)  # (its reaper exits within a second or two)
    return proc.returncode, elapsed, sum(alive_process(p) for p in alive)


def run_id_of(root: Path) -> str:
    runs = [p.name for p in root.iterdir() if (p / "config.yaml").is_file()]
    if len(runs) != 1:
        raise RuntimeError(f"expected one run under {root}, found {runs}")
    return runs[0]


def environment(prefect_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="ERROR", NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(REPO),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")  # (20 s by default: too short on a busy machine)
    env.pop("PREFECT_API_URL", None)  # each process runs its own embedded server (SQLite under PREFECT_HOME)
    return env


def reference(config: Path, overrides: list[str], root: Path, env: dict[str, str]) -> tuple[Snapshot, float]:
    t0 = time.perf_counter()
    proc = lvd("run", str(config), f"run.root={root}", *overrides, env=env)
    if proc.wait() != 0:
        raise RuntimeError(f"the reference run failed (exit {proc.returncode}); run it by hand to see why")
    return snapshot(root / run_id_of(root)), time.perf_counter() - t0


def _events(root: Path) -> list[dict]:
    runs = [p for p in root.iterdir() if (p / "events.jsonl").is_file()] if root.is_dir() else []
    return RunDir(root, runs[0].name).events() if runs else []


@dataclass(frozen=True)
class Anchor:
    """Where a kill's delay starts counting: once the process's flow has started `stage` and, with `checkpoint`,
    once pretraining has also written a resume checkpoint at that step or later."""

    stage: str
    checkpoint: int | None = None


def _reached(root: Path, anchor: Anchor, since: int) -> bool:
    if not any(e.get("event") == "started" and e.get("stage") == anchor.stage for e in _events(root)[since:]):
        return False
    if anchor.checkpoint is None:
        return True
    try:
        step = checkpoint_step(root)
    except FileNotFoundError:  # replaced between the check and the read (AtomicCheckpoint renames twice): not yet
        return False
    return step is not None and step >= anchor.checkpoint


def wait_for(root: Path, anchor: Anchor, since: int, proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until the run's event log, past its first `since` events, says that the anchor's stage started (and its
    checkpoint exists); False when the process exited first (the stage was cached, or the flow ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _reached(root, anchor, since):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    raise TimeoutError(f"{anchor} not reached under {root} within {timeout:g} s")


def in_progress(root: Path, since: int) -> str:
    """The stage the current process was running (started, not ended) per the events it logged, those past the run's
    first `since`; 'start-up' if its flow had not started yet (a resumed process killed before its flow started is
    not in the stage the previous process was killed in)."""
    history = attempts_from(_events(root)[since:])
    if not history:
        return "start-up"
    running = [name for name, s in history[-1].stages.items() if s.outcome == "running"]
    return running[-1] if running else "between stages"


def checkpoint_step(root: Path) -> int | None:
    """The step of the pretraining resume checkpoint on disk, where a resume starts (None: none yet). The names
    `training.callbacks.find_resume_checkpoint` looks for; a sharded (directory) checkpoint keeps its step in meta.pt."""
    import torch

    runs = [p for p in root.iterdir() if (p / "config.yaml").is_file()] if root.is_dir() else []
    for name in ("last.ckpt", "last.ckpt.old") if runs else ():
        path = runs[0] / "stages" / "pretrain" / "checkpoints" / name
        target = path / "meta.pt" if path.is_dir() else path
        if target.is_file():
            return int(torch.load(target, map_location="cpu", weights_only=True)["global_step"])
    return None


@dataclass
class TrialResult:
    snapshot: Snapshot
    problems: list[str]  # what `lvd audit` found
    killed_in: list[str]  # per kill: the stage it interrupted, or "finished" when the flow was already done
    finished_after: float | None = None  # seconds the first process took when it ended before its kill
    # Per kill inside pretraining: the checkpoint step on disk after the kill, where a resume must start (None: none
    # yet, from scratch).
    resumed_from: list[int | None] = field(default_factory=list)
    # The steps the run's own events say its pretraining resumed at ("training_resumed"), in order.
    training_resumed: list[int] = field(default_factory=list)
    # Per stop that landed: (exit status, seconds from the signal to the exit, descendants left alive).
    exits: list[tuple[int, float, int]] = field(default_factory=list)


def trial(config: Path, overrides: list[str], root: Path, env: dict[str, str], delays: list[float],
          timeout: float, anchors: list[Anchor] | None = None, kills: list[Kill] | None = None) -> TrialResult:
    """Start the run; after each delay, stop it (`kills[i]`: SIGKILL to the process tree by default) and resume;
    finally resume to the end.

    A delay counts from the start of the process, or, with `anchors`, from the moment the process reaches
    `anchors[i]` (a kill inside a chosen stage, whatever the start-up and the earlier stages took)."""
    # The trial's processes get a temporary folder of their own, removed at the end: a SIGKILLed process never
    # removes its temporary files (wandb, which img2dataset imports, makes two folders at import). Under the default
    # temporary folder, so the paths stay short (multiprocessing's AF_UNIX sockets live there: 107 characters at most).
    with tempfile.TemporaryDirectory(prefix="lvd-chaos-") as tmp:
        return _trial(config, overrides, root, {**env, "TMPDIR": tmp}, delays, timeout, anchors,
                      kills or [Kill()] * len(delays))


def _trial(config: Path, overrides: list[str], root: Path, env: dict[str, str], delays: list[float],
           timeout: float, anchors: list[Anchor] | None, kills: list[Kill]) -> TrialResult:
    killed_in: list[str] = []
    exits: list[tuple[int, float, int]] = []
    resumed_from: list[int | None] = []
    finished_after = None
    started = time.perf_counter()
    since = 0  # events logged before the current process started
    proc = lvd("run", str(config), f"run.root={root}", *overrides, env=env)
    for i, delay in enumerate(delays):
        if anchors is not None:
            wait_for(root, anchors[i], since, proc, timeout)  # (an exited process: "finished" just below)
        try:
            proc.wait(timeout=delay)
            killed_in.append("finished")
            if finished_after is None and len(killed_in) == 1:
                finished_after = time.perf_counter() - started
        except subprocess.TimeoutExpired:
            exits.append(stop(proc, kills[i]))
            killed_in.append(in_progress(root, since))
            if killed_in[-1] == "pretrain":
                resumed_from.append(checkpoint_step(root))
        since = len(_events(root))
        if root.is_dir() and any((p / "config.yaml").is_file() for p in root.iterdir()):
            proc = lvd("resume", run_id_of(root), "--root", str(root), env=env)
        else:  # killed before the run directory existed: the same command again (same config, same run id)
            proc = lvd("run", str(config), f"run.root={root}", *overrides, env=env)
    if proc.wait(timeout=timeout) != 0:
        raise RuntimeError(f"the final resume under {root} failed (exit {proc.returncode})")
    run_dir = root / run_id_of(root)
    audit = audit_run(RunDir(root, run_dir.name))
    resumed = [e["step"] for e in _events(root) if e.get("event") == "training_resumed" and e["stage"] == "pretrain"]
    return TrialResult(snapshot(run_dir), [f"[{c}] {m}" for c, m in audit.problems], killed_in, finished_after,
                       resumed_from, resumed, exits)
