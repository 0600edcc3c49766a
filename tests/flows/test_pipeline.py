"""End to end: the whole flow on a tiny demo crawl, with a failure injected mid-way, resume, and a cached re-run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from flows.cli import main as cli
from infra.demo.crawl import BAD_INPUT_REASONS
from infra.lineage import Ledger, check_terminal_outcomes
from infra.run import RunDir
from infra.runs import prepare_run
from infra.stage import FAULT_ENV

REPO = Path(__file__).resolve().parents[2]
STAGES = ["crawl", "ingest", "nsfw", "faces", "dedup", "embed", "retrieve", "rebalance", "corpus", "pretrain", "evaluate"]
pytestmark = pytest.mark.slow


@dataclass
class Runs:
    run: RunDir
    states: list  # Prefect final states of the three flow runs: failed, resumed, re-run
    events: list[list[dict]]  # events of each flow run


# Pretraining 16 steps rather than the tiny config's 10: the chaos test stops the run once a checkpoint at step 4
# exists, and with 10 steps the rest of pretraining (6 steps and the exports) was once over before the signal landed on
# a loaded machine ("between stages"). Its reference is this module's run, so both use it.
LONGER = ["train.max_steps=16"]


@pytest.fixture(scope="module")
def runs(prefect_server, tmp_path_factory) -> Runs:
    from flows.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("runs")
    run, _ = prepare_run(REPO / "configs" / "tiny.yaml", [f"run.root={root}", *LONGER])
    mp = pytest.MonkeyPatch()
    states, events, seen = [], [], 0
    for fault in ("dedup", None, None):
        if fault:
            mp.setenv(FAULT_ENV, fault)
        else:
            mp.delenv(FAULT_ENV, raising=False)
        states.append(run_pipeline(str(root), run.run_id))
        all_events = run.events()
        events.append(all_events[seen:])
        seen = len(all_events)
    mp.undo()
    return Runs(run, states, events)


def _stage_events(events: list[dict], kind: str) -> list[str]:
    return [e["stage"] for e in events if e["event"] == kind]


def test_failure_then_resume_redoes_nothing_before_the_failed_stage(runs):
    failed, resumed, _ = runs.states
    assert failed.is_failed() and "injected fault in stage 'dedup'" in failed.message
    assert _stage_events(runs.events[0], "completed") == STAGES[:4]
    assert _stage_events(runs.events[0], "failed") == ["dedup"]
    assert resumed.is_completed()
    # The completed stages are Prefect cache hits (their task bodies do not even run); see the API test below.
    assert _stage_events(runs.events[1], "started") == STAGES[4:]
    assert _stage_events(runs.events[1], "completed") == STAGES[4:]


def test_rerun_of_a_completed_run_is_all_cached(runs):
    assert runs.states[2].is_completed()
    assert _stage_events(runs.events[2], "started") == []


def test_prefect_api_shows_one_completed_task_run_per_stage(runs):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def task_states(flow_run_id):
        async with get_client() as client:
            trs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return sorted((t.name, t.state.type.value, t.state.name) for t in trs)

    resumed = asyncio.run(task_states(runs.states[1].state_details.flow_run_id))
    order = {s: i for i, s in enumerate(STAGES)}
    assert [n for n, _, _ in sorted(resumed, key=lambda t: order[t[0]])] == STAGES
    assert {t for _, t, _ in resumed} == {"COMPLETED"}
    rerun = asyncio.run(task_states(runs.states[2].state_details.flow_run_id))
    assert sorted(n for n, _, _ in rerun) == sorted(STAGES)
    assert {(t, name) for _, t, name in rerun} == {("COMPLETED", "Cached")}


def test_prefect_shows_named_tagged_flow_runs_shard_tasks_and_every_stages_log_lines(runs):
    """What the Prefect UI shows of the three flow runs: names, tags, shard task names, and the Logs tab."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()  # the logs still queued in this process
    ids = [s.state_details.flow_run_id for s in runs.states]

    async def read():
        async with get_client() as client:
            flow_runs = [await client.read_flow_run(i) for i in ids]
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[ids[0]])))
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[ids[1]])),
                                          sort=LogSort.TIMESTAMP_ASC)
            return flow_runs, tasks, logs

    flow_runs, tasks, logs = asyncio.run(read())
    run_id = runs.run.run_id
    assert [f.name for f in flow_runs] == [f"{run_id} attempt 1", f"{run_id} attempt 2", f"{run_id} attempt 3"]
    assert all(sorted(f.tags) == sorted(["lvd", "config:tiny", *(f"stage:{s}" for s in STAGES)]) for f in flow_runs)
    shards = sorted(p.stem for p in (runs.run.stage_dir("ingest") / "shards").glob("*.tar"))
    names = {t.name for t in tasks}
    for stage in ("ingest", "nsfw", "faces"):  # the shard tasks of the first flow run (dedup failed on entry)
        assert {n for n in names if n.startswith(f"{stage}[")} == {f"{stage}[{s}]" for s in shards}
    messages = [log.message for log in logs if log.name == "lvd"]  # (with Prefect's own, at PREFECT_LOGGING_LEVEL)
    for stage in STAGES[:4]:  # completed by the first flow run: cache hits
        assert f"{stage}: completed by an earlier attempt, reused" in messages
    for stage in STAGES[4:]:
        assert f"{stage}: started" in messages
        assert any(m.startswith(f"{stage}: completed in ") for m in messages), stage
    n = len(shards)
    assert any(m.startswith(f"dedup: {n}/{n} shards (286 images) in ") for m in messages), messages  # faces kept 286
    assert any(m.startswith("pretrain: step 16/16 (") and ", loss " in m for m in messages), messages
    assert any(m.startswith("evaluate: 9/9 model x benchmark in ") for m in messages), messages
    assert len(messages) == len(set(messages))  # one line per event


def test_every_input_row_has_exactly_one_terminal_outcome(runs):
    check = check_terminal_outcomes(Ledger(runs.run.path))
    urls = pd.read_parquet(runs.run.stage_dir("crawl") / "urls.parquet")
    assert check.ok, (check.missing[:5], check.multiple[:5])
    assert check.n_rows == len(urls)
    corpus = pd.read_parquet(runs.run.stage_dir("corpus") / "corpus.parquet")
    assert check.n_kept == int((corpus["source"] == "pool").sum()) > 0


def test_broken_entries_are_recorded_with_their_reason(runs):
    truth = pd.read_parquet(runs.run.stage_dir("crawl") / "truth.parquet")
    terminal = Ledger(runs.run.path).terminal_outcomes().set_index("row_id")
    broken = truth[truth["kind"] == "broken"]
    got = {v: sorted(set(terminal.loc[broken.loc[broken["variant"] == v, "row_id"], "reason"])) for v in broken["variant"]}
    assert got == {v: [BAD_INPUT_REASONS[v]] for v in BAD_INPUT_REASONS}
    assert got["http_404"] == ["http_404"] and got["zero_bytes"] == ["empty_response"]  # spelled out, for readers
    quirks = truth[truth["kind"] == "quirk"]
    dropped_at_ingest = terminal.loc[quirks["row_id"]].query("stage == 'ingest'")
    assert dropped_at_ingest.empty, dropped_at_ingest[["stage", "reason"]]  # odd but valid images are kept


def test_planted_evaluation_copies_are_dropped(runs):
    truth = pd.read_parquet(runs.run.stage_dir("crawl") / "truth.parquet")
    terminal = Ledger(runs.run.path).terminal_outcomes().set_index("row_id")
    copies = truth[(truth["kind"] == "eval_copy") & (truth["variant"] != "crop")]  # crops: see issue 4
    reasons = terminal.loc[copies["row_id"], "reason"]
    assert set(reasons) <= {"eval_contamination", "near_duplicate"}, reasons.value_counts().to_dict()


def test_lineage_cli_answers_for_a_corpus_image_and_a_dropped_url(runs, capsys):
    root, run_id = str(runs.run.root), runs.run.run_id
    corpus = pd.read_parquet(runs.run.stage_dir("corpus") / "corpus.parquet")
    image_id = corpus.loc[corpus["source"] == "pool", "image_id"].iloc[0]
    assert cli(["lineage", run_id, image_id, "--root", root, "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    stages = [e["stage"] for e in chain]
    assert stages[0] == "ingest" and stages[-1] == "corpus" and chain[-1]["kind"] == "keep"
    assert {"nsfw", "faces", "dedup", "retrieve"} <= set(stages)
    truth = pd.read_parquet(runs.run.stage_dir("crawl") / "truth.parquet")
    url = truth.loc[truth["variant"] == "http_404", "url"].iloc[0]
    assert cli(["lineage", run_id, url, "--root", root]) == 0
    text = capsys.readouterr().out
    assert "outcome: dropped at stage ingest: http_404" in text and url in text


def test_status_and_summary(runs, capsys):
    assert cli(["status", runs.run.run_id, "--root", str(runs.run.root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert {s["state"] for s in summary["stages"]} == {"completed"}
    models = summary["metrics"]["mnist"]
    assert set(models) == {"pretrained", "random-init", "raw-pixels"}
    assert all(0 <= m["knn_top1_k20"] <= 100 for m in models.values())


def test_the_flow_ends_with_the_run_report(runs, capsys):
    report = runs.run.path / "report.html"
    assert report.is_file()
    written = [e for e in runs.events[1] if e["event"] == "report_written"]
    assert [e["path"] for e in written] == [str(report)]
    html = report.read_text()
    for section in ("funnel", "safety", "dedup", "retrieval", "rebalance", "composition", "training", "evaluation"):
        assert f'<section id="{section}">' in html
    assert cli(["status", runs.run.run_id, "--root", str(runs.run.root)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"report: {report}")


def test_audit_passes_then_names_a_corrupted_shard_byte_and_a_removed_ledger_row(runs, tmp_path, capsys):
    import shutil
    import tarfile

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    run_id = runs.run.run_id
    shutil.copytree(runs.run.path, tmp_path / run_id)
    assert cli(["audit", run_id, "--root", str(tmp_path)]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.rstrip().endswith("audit: OK")

    tar_path = tmp_path / run_id / "stages" / "corpus" / "shards" / "00000.tar"
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.isfile())
    with open(tar_path, "r+b") as f:  # flip one byte in the middle of the first image
        f.seek(member.offset_data + member.size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    image_id = member.name.split(".")[0]

    ledger_file = tmp_path / run_id / "stages" / "ingest" / "ledger" / "00000.parquet"
    table = pq.read_table(ledger_file)
    drops = pc.equal(table["kind"], "drop").to_pylist()
    victim = drops.index(True)
    row_id, reason = table["row_id"][victim].as_py(), table["reason"][victim].as_py()
    pq.write_table(table.take([i for i in range(len(table)) if i != victim]), ledger_file)

    assert cli(["audit", run_id, "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL [corpus] image {image_id} in shard 00000: bytes hash to" in out
    assert "FAIL [outputs] stages/corpus/shards/00000.tar: sha256 differs from the corpus manifest" in out
    assert "FAIL [outputs] stages/ingest/ledger/00000.parquet: sha256 differs from the ingest manifest" in out
    assert f"FAIL [outcomes] input row {row_id}: no terminal outcome" in out
    assert f"FAIL [counts] stage ingest: drops per reason differ (manifest, ledger): {{'{reason}': (" in out
    assert out.rstrip().endswith("audit: 5 discrepancies")


def test_kills_and_ctrl_c_in_curation_and_pretraining_then_resume_give_the_same_corpus_ledger_and_training(
        runs, tmp_path, prefect_home):
    """The run is stopped three times, each time resumed: the `lvd` process alone SIGKILLed 2 s after its flow started
    `ingest` (shards being downloaded; what the out-of-memory killer does: its reaper stops Prefect's server, which
    outlived such a kill before, and records the end); Ctrl-C (SIGINT to the process group, as a terminal sends it) 0.2 s into the
    resumed flow's NSFW scoring; and Ctrl-C twice to the `lvd` process alone as soon as the resumed flow's pretraining
    has written a checkpoint at step 4 or later (one every 2 steps here; an execution setting, which must not change
    the trajectory). Ctrl-C stops within seconds with status 130, recorded as interrupted, no process left behind.
    The result equals the module's completed run (same config and seed): corpus bytes, ledger, and every pretraining
    step once with the same losses; and the run's events record that the resumed pretraining continued from the
    checkpoint the stop left (read independently of the code that resumes), not from step 0. The stops are anchored
    to the flow's progress, not to the process start (the start-up alone takes ~17 s on 2 idle cores, more in CI).
    bench/chaos.py runs random SIGKILL trials."""
    import signal

    from evaluation.report.collect import Run, attempts
    from infra.chaos import Anchor, Kill, environment, run_id_of, snapshot, trial
    from infra.history import describe

    # Evaluation is off: it writes no ledger event and no corpus byte, and the comparison is about those.
    result = trial(REPO / "configs" / "tiny.yaml", ["evaluate.enabled=false", "train.checkpoint_every=2", *LONGER],
                   tmp_path / "chaos", environment(prefect_home(tmp_path / "prefect-home")), [2.0, 0.2, 0.0],
                   timeout=900, anchors=[Anchor("ingest"), Anchor("nsfw"), Anchor("pretrain", checkpoint=4)],
                   kills=[Kill(group=False), Kill(signal.SIGINT), Kill(signal.SIGINT, group=False, times=2)])
    assert result.killed_in == ["ingest", "nsfw", "pretrain"]
    assert [(code, alive) for code, _, alive in result.exits] == [(-9, 0), (130, 0), (130, 0)]
    assert all(seconds < 30 for _, seconds, _ in result.exits[1:]), result.exits  # ~2-3 s on an idle machine
    assert len(result.resumed_from) == 1 and 4 <= result.resumed_from[0] < 16, result.resumed_from
    assert result.training_resumed == result.resumed_from  # the earlier resumes had no checkpoint: they started at 0
    # The report's record of the four processes: where each stopped, what the last one reused and resumed from.
    run_dir = tmp_path / "chaos" / run_id_of(tmp_path / "chaos")
    history = attempts(Run(run_dir))
    assert [(a.by, a.completed, a.stopped_in, a.interrupted) for a in history] == [
        ("lvd run", False, "ingest", None), ("lvd resume", False, "nsfw", "SIGINT"),
        ("lvd resume", False, "pretrain", "SIGINT"), ("lvd resume", True, None, None)]
    assert [r["ended"] for r in describe(history)][:3] == [
        "killed or crashed in ingest (no out-of-memory kill was counted; its reaper recorded the end)",
        "interrupted by Ctrl-C (SIGINT) in nsfw", "interrupted by Ctrl-C (SIGINT) in pretrain"]
    assert history[1].stages["ingest"].outcome == "completed" and history[1].stages["crawl"].outcome == "cached"
    assert {n for n, s in history[3].stages.items() if s.outcome == "cached"} == {
        "crawl", "ingest", "nsfw", "faces", "dedup", "embed", "retrieve", "rebalance", "corpus"}
    assert history[3].stages["pretrain"].from_step == result.resumed_from[0]
    assert result.problems == []
    reference = snapshot(runs.run.path)
    assert result.snapshot.corpus == reference.corpus
    assert result.snapshot.n_events == reference.n_events
    assert result.snapshot.ledger == reference.ledger
    assert len(reference.train) == 16 and result.snapshot.same_training(reference)
