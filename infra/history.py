"""A run's history from its events.jsonl: every process that worked on it (`lvd run`, `lvd resume`,
`lvd retry-failed`), what each ran and reused, and where it stopped. Shown by the report and by `lvd status`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from infra.memory import gib
from infra.run import RunDir
from infra.run_lock import UNKNOWN, Holder
from infra.stopping import SIGNAL_ERRORS


@dataclass
class StageOutcome:
    outcome: str  # "running" (started, no end recorded), "completed", "cached" (skipped: done before), "failed"
    reused: int = 0  # shards finished by an earlier attempt (shard_skipped)
    done: int = 0  # shards this attempt finished
    from_step: int | None = None  # training: the checkpoint step it continued from
    from_run: str | None = None  # cached: taken from another run that completed it with the same key
    error: str | None = None
    why: str | None = None  # computed again: what changed since it completed or started (infra.stage.why_again)
    peak: int | None = None  # the peak resident memory of the run's processes while it worked (infra.memory.PeakMemory)


@dataclass
class Attempt:
    started: str
    by: str  # "lvd run", "lvd resume", "lvd retry-failed", or the Prefect deployment's flow run that started it
    changed: list[str] = field(default_factory=list)  # configuration keys `lvd resume` amended first
    stages: dict[str, StageOutcome] = field(default_factory=dict)
    completed: bool = False
    retried: dict[str, Any] = field(default_factory=dict)  # lvd retry-failed: attempt, rows, recovered
    error: str | None = None  # lvd retry-failed: why it failed
    interrupted: str | None = None  # the signal that stopped the process (SIGINT: Ctrl-C), or CANCELLED, if recorded
    cpus: str | None = None  # the CPUs it could use (infra.cpus: affinity, cgroup quota), where it recorded them
    memory: str | None = None  # the memory it could use (infra.memory: the machine's, or its cgroup's limit)
    # Its process ended without recording why, as its reaper (infra.reaper) found: `oom_kills` where the kernel's
    # out-of-memory killer had ended processes in its cgroup or on the machine meanwhile.
    lost: dict[str, Any] | None = None

    @property
    def stopped_in(self) -> str | None:
        """The stage that failed, or that was running when the attempt's record stops."""
        for outcome in ("failed", "running"):
            stages = [name for name, s in self.stages.items() if s.outcome == outcome]
            if stages:
                return stages[-1]
        return None


def attempts(run: RunDir) -> list[Attempt]:
    """The run's history, from its events.jsonl: one entry per process that ran the flow (`lvd run`, `lvd resume`)
    or retried failed downloads (`lvd retry-failed`), with what each ran, reused and where it stopped."""
    return attempts_from(run.events())


def attempts_from(events: Iterable[dict[str, Any]]) -> list[Attempt]:
    """`attempts` of these events (a run's, in order, or the tail one process logged)."""
    out: list[Attempt] = []
    resumed, changed, launched = False, [], False
    for e in events:
        kind, stage = e.get("event"), e.get("stage")
        if kind == "resumed":
            resumed = True
        elif kind == "config_amended":
            changed += sorted(e.get("changed") or {})
        elif kind == "flow_started" and launched:  # the flow of the attempt `launched` opened (before Prefect started)
            launched = False
        elif kind in ("launched", "flow_started", "retry_started"):  # (runs made before `launched`: flow_started)
            by = ("lvd retry-failed" if kind == "retry_started" else e.get("by") or ("lvd resume" if resumed
                                                                                        else "lvd run"))
            out.append(Attempt(e.get("time", ""), by, changed, cpus=e.get("cpu_budget"), memory=e.get("memory_budget")))
            if kind == "retry_started":
                out[-1].stages["ingest"] = StageOutcome("running")
            resumed, changed, launched = False, [], kind == "launched"
        elif not out:
            continue  # events of a run directory older than these records
        elif kind in ("stages_completed", "flow_completed"):
            out[-1].completed = True
        elif kind == "retried":
            out[-1].completed = True
            out[-1].retried = {k: e.get(k) for k in ("attempt", "rows", "recovered")}
        elif kind == "retry_failed":
            out[-1].error = e.get("error") or "no error recorded"
        elif kind == "process_lost":
            out[-1].lost = e
        elif kind == "interrupted":
            out[-1].interrupted = CANCELLED if e.get("cancelled_in") else e.get("signal") or "a signal"
            for st in out[-1].stages.values():  # a stage the signal cut short is unfinished, not failed
                if st.outcome == "failed" and (st.error or "").startswith(SIGNAL_ERRORS):
                    st.outcome, st.error = "running", None
        elif stage:
            s = out[-1].stages.setdefault(stage, StageOutcome("running"))
            if kind in ("started", "completed", "failed"):
                s.outcome = kind if kind != "started" else "running"
                s.error = e.get("error") if kind == "failed" else None
                s.why = e.get("why") or s.why
                s.peak = e.get("peak_memory") if kind != "started" else None
            elif kind in ("reused", "skipped"):  # the flow's record of a stage completed before / run_stage's
                s.outcome, s.from_run = "cached", e.get("from_run")
            elif kind == "shard_skipped":
                s.reused += 1
            elif kind == "shard_done":
                s.done += 1
            elif kind == "training_resumed":
                s.from_step = e.get("step")
    return out


SIGNAL_WORDS = {"SIGINT": "Ctrl-C (SIGINT)"}
CANCELLED = "cancelled in Prefect"  # `Attempt.interrupted` of a SIGTERM that a cancellation in Prefect sent


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _stage_note(name: str, s: StageOutcome) -> str:
    notes = [s.why.removeprefix("computed again: ").rsplit(" since ", 1)[0]] if s.why else []
    notes += [f"{s.reused:,} shard{'s' if s.reused != 1 else ''} reused"] if s.reused else []
    if s.from_step is not None:
        notes.append(f"resumed at step {s.from_step:,}")
    if s.outcome == "failed":
        notes.append("failed: " + _short(s.error or "no error recorded"))
    elif s.outcome == "running":
        notes.append("did not finish")
    return name + (f" ({'; '.join(notes)})" if notes else "")


def describe(history: list[Attempt], live: Holder | None = None) -> list[dict[str, Any]]:
    """One row per attempt, in words: `by` (with the keys a resume changed), `what` it did, how it `ended`. `live`:
    the process that holds the run now (`infra.run_lock.holder`), which tells the last attempt's state when its record
    has no end: running, or stopped without recording one (killed, out of memory, its machine lost)."""
    rows = []
    for i, a in enumerate(history):
        by = a.by + (f" (changed {', '.join(a.changed)})" if a.changed else "")
        if a.by == "lvd retry-failed":
            what = (f"ingest: {a.retried.get('rows') or 0:,} failed URLs downloaded again (retry "
                    f"{a.retried.get('attempt')}), {a.retried.get('recovered') or 0:,} recovered" if a.retried
                    else "ingest: a retry of the failed URLs")
        else:
            ran = [_stage_note(n, s) for n, s in a.stages.items() if s.outcome != "cached"]
            cached = [n + (f" (from run {s.from_run})" if s.from_run else "") for n, s in a.stages.items()
                      if s.outcome == "cached"]
            what = "; ".join(p for p in ("ran " + ", ".join(ran) if ran else "",
                                         "reused (completed before): " + ", ".join(cached) if cached else "") if p)
        stopped = a.stopped_in
        if a.completed:
            ended = "completed"
        elif a.error is not None:
            ended = "failed: " + _short(a.error)
        elif a.interrupted == CANCELLED:
            ended = f"cancelled in Prefect {_where(a)}"
        elif a.interrupted is not None:
            ended = f"interrupted by {SIGNAL_WORDS.get(a.interrupted, a.interrupted)} {_where(a)}"
        elif stopped is not None and a.stages[stopped].outcome == "failed":
            ended = f"failed in {stopped}"
        elif a.lost is not None:
            ended = _lost(a)
        else:
            ended = _unrecorded_end(a, live if i == len(history) - 1 else None)
        rows.append({"attempt": i + 1, "started": a.started, "by": by, "what": what or "nothing", "ended": ended,
                     "cpus": a.cpus, "memory": a.memory,
                     "on": " and ".join(x for x in (a.cpus, a.memory) if x),  # what it could use
                     "peak": _peak(a)})
    return rows


def _unrecorded_end(a: Attempt, live: Holder | None) -> str:
    """How an attempt whose record stops ended: running (`live` holds the run), unknown (`run_lock.UNKNOWN`: a file
    system without locks), or stopped without recording why."""
    where = _where(a)
    if live is UNKNOWN:
        return f"running, or stopped {where} without recording why"
    if live is not None:
        return f"running {where if a.stages else '(starting)'}: {live.describe()}"
    return f"stopped {where} without recording why (killed, out of memory, or its machine lost)"


def _peak(a: Attempt) -> str | None:
    """`1.4 GiB (nsfw)`: the highest peak memory its stages recorded, and where; None where none did."""
    peaks = [(s.peak, name) for name, s in a.stages.items() if s.peak]
    if not peaks:
        return None
    peak, name = max(peaks)
    return f"{gib(peak)} ({name})"


def _lost(a: Attempt) -> str:
    """How an attempt ended whose reaper found its process gone (infra.reaper)."""
    lost = a.lost or {}
    if lost.get("oom_kills"):
        could = f" (it could use {gib(lost['memory'])})" if lost.get("memory") else ""
        return f"killed by the kernel's out-of-memory killer {_where(a)}{could}"
    return f"killed or crashed {_where(a)} (no out-of-memory kill was counted; its reaper recorded the end)"


def _where(a: Attempt) -> str:
    """Where an attempt's record stops: `in <stage>`, `between stages`, `before its first stage`."""
    stopped = a.stopped_in
    return f"in {stopped}" if stopped else "between stages" if a.stages else "before its first stage"
