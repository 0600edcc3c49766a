"""Where `infra.chaos` says a kill landed: from the events the killed process itself logged."""

from infra.chaos import in_progress
from infra.run import RunDir


def test_a_kill_lands_in_the_stage_the_killed_process_was_running(tmp_path):
    run = RunDir(tmp_path, "r")
    assert in_progress(tmp_path, 0) == "start-up"  # no run directory yet
    run.log_event("flow_started")
    run.log_event("started", "crawl", key="k")
    run.log_event("completed", "crawl", key="k", counts={})
    assert in_progress(tmp_path, 0) == "between stages"
    run.log_event("started", "ingest", key="k")
    run.log_event("shard_done", "ingest", shard="00000")
    assert in_progress(tmp_path, 0) == "ingest"
    # The resumed process, killed before its flow started, was not in the stage its predecessor was killed in.
    since = len(run.events())
    run.log_event("resumed")
    assert in_progress(tmp_path, since) == "start-up"
    run.log_event("flow_started")
    run.log_event("reused", "crawl")
    assert in_progress(tmp_path, since) == "between stages"
    run.log_event("started", "ingest", key="k")
    run.log_event("shard_skipped", "ingest", shard="00000")
    assert in_progress(tmp_path, since) == "ingest"
    run.log_event("failed", "ingest", key="k", error="OSError: disk full")
    assert in_progress(tmp_path, since) == "between stages"
