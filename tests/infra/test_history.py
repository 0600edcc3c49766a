"""A run's attempts as `lvd status` and the report show them, from events.jsonl."""

from __future__ import annotations

from flows.interrupt import Interrupts
from infra.history import attempts_from, describe
from infra.run import RunDir


def _ended(events: list[dict]) -> list[tuple[str, str]]:
    return [(r["by"], r["ended"]) for r in describe(attempts_from(events))]


def test_an_attempt_begins_when_the_process_launches_it_not_when_its_flow_starts():
    """An `lvd run` stopped while Prefect was still starting is an attempt of its own (it was shown nowhere); a
    launched attempt whose flow started is one attempt, not two; runs made before `launched` read as they did."""
    ingest = [{"event": "started", "stage": "ingest"}, {"event": "completed", "stage": "ingest"}]
    assert _ended([{"event": "launched"}, {"event": "interrupted", "signal": "SIGINT"},
                   {"event": "resumed"}, {"event": "launched"}, {"event": "flow_started"}, *ingest,
                   {"event": "flow_completed"}]) == [
        ("lvd run", "interrupted by Ctrl-C (SIGINT) before its first stage"), ("lvd resume", "completed")]
    assert _ended([{"event": "flow_started"}, {"event": "started", "stage": "ingest"},
                   {"event": "interrupted", "signal": "SIGINT"}, {"event": "resumed"}, {"event": "flow_started"},
                   *ingest, {"event": "flow_completed"}]) == [
        ("lvd run", "interrupted by Ctrl-C (SIGINT) in ingest"), ("lvd resume", "completed")]
    assert _ended([{"event": "launched"}]) == [("lvd run", "stopped before its first stage without recording why (killed, out of memory, or its machine lost)")]


def test_a_stop_cancels_only_the_flow_run_its_own_process_started(tmp_path):
    """Ctrl-C during a resume's start-up must not mark the previous attempt's Prefect flow run Cancelled."""
    run = RunDir(tmp_path, "r")
    run.path.mkdir(parents=True)
    run.log_event("launched")
    run.log_event("flow_started", prefect_flow_run="earlier")
    handler = Interrupts(run, "lvd resume r")  # this process, from here
    run.log_event("launched")
    assert handler._flow_run() is None
    run.log_event("flow_started", prefect_flow_run="mine")
    assert handler._flow_run() == "mine"


def test_a_stage_computed_again_says_why_in_the_attempts_table():
    why = "computed again: its code changed (curation/netguard.py) since it completed"
    rows = describe(attempts_from([{"event": "launched"}, {"event": "flow_started"},
                                   {"event": "started", "stage": "ingest", "why": why},
                                   {"event": "completed", "stage": "ingest"},
                                   {"event": "skipped", "stage": "nsfw"}, {"event": "flow_completed"}]))
    assert rows[0]["what"] == ("ran ingest (its code changed (curation/netguard.py)); "
                               "reused (completed before): nsfw")


def test_each_attempt_shows_the_cpus_and_memory_it_could_use_and_how_its_reaper_found_it_ended():
    """`lvd run` records the CPUs (affinity, cgroup quota) and memory (the machine's, or a cgroup limit) it may use in
    its `launched` event; `lvd status` and the report show them per attempt (a resume in a smaller container reads
    differently); older runs show nothing. An attempt whose process was killed reads as its reaper recorded it."""
    from evaluation.report.sections import attempts_table
    from infra.summary import format_summary

    one = "2 CPUs (affinity 2, no cgroup quota)"
    two = "1 CPU (affinity 64, cgroup quota 0.5 CPUs: /sys/fs/cgroup/cpu.max)"
    mem = "2.0 GiB memory (cgroup limit: /sys/fs/cgroup/memory.max; machine 251.5 GiB)"
    events = [{"event": "launched", "cpus": 2, "cpu_budget": one, "time": "2026-12-07T13:30:00"},
              {"event": "interrupted", "signal": "SIGINT"}, {"event": "resumed"},
              {"event": "launched", "cpus": 1, "cpu_budget": two, "memory": 2**31, "memory_budget": mem,
               "time": "2026-12-07T13:31:00"},
              {"event": "flow_started"}, {"event": "started", "stage": "nsfw"},
              {"event": "process_lost", "pid": 9, "oom_kills": 1, "memory": 2**31, "memory_budget": mem},
              {"event": "resumed"}, {"event": "launched", "cpus": 1, "cpu_budget": two, "memory_budget": mem,
                                     "time": "2026-12-07T13:32:00"},
              {"event": "flow_started"}, {"event": "started", "stage": "nsfw"}, {"event": "process_lost", "pid": 10},
              {"event": "resumed"}, {"event": "flow_started", "time": "2026-12-07T13:33:00"}]
    rows = describe(attempts_from(events))
    assert [r["cpus"] for r in rows] == [one, two, two, None]
    assert [r["on"] for r in rows] == [one, f"{two} and {mem}", f"{two} and {mem}", ""]
    text = format_summary({"run_id": "r", "path": "p", "stages": [], "attempts": rows})
    assert text.splitlines()[text.splitlines().index("attempts:") + 1:] == [
        "  1  2026-12-07 13:30  lvd run: interrupted by Ctrl-C (SIGINT) before its first stage", "     nothing",
        f"     on {one}",
        "  2  2026-12-07 13:31  lvd resume: killed by the kernel's out-of-memory killer in nsfw (it could use 2.0 GiB)",
        "     ran nsfw (did not finish)", f"     on {two} and {mem}",
        "  3  2026-12-07 13:32  lvd resume: killed or crashed in nsfw (no out-of-memory kill was counted; its reaper recorded the end)",
        "     ran nsfw (did not finish)", f"     on {two} and {mem}",
        "  4  2026-12-07 13:33  lvd resume: stopped before its first stage without recording why (killed, out of memory, or its machine lost)",
        "     nothing"]
    html = attempts_table(attempts_from(events))
    assert f"lvd run on {one}<" in html and f"lvd resume on {two} and {mem}<" in html
