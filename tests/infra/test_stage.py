import pytest

from infra.config import load_config
from infra.run import RunDir
from infra.stage import FAULT_ENV, InjectedFault, StageInputError, StageResult, StageSpec, run_stage, stage_state


def _specs(calls):
    def first(ctx):
        tracker = ctx.tracker()
        for shard in ("00000", "00001", "00002"):
            def work(shard=shard):
                calls.append(shard)
                (ctx.dir / f"{shard}.txt").write_text(f"{shard} k={ctx.cfg.dedup.k}")
                return {"kept": 1}
            tracker.run(shard, work)
        return StageResult(counts={"kept": 3}, outputs=sorted(ctx.dir.glob("*.txt")))

    def second(ctx):
        calls.append("second")
        return StageResult(counts={"kept": 1})

    return StageSpec("a", ("dedup",), (), first), StageSpec("b", ("corpus",), ("a",), second)


def test_skip_when_complete_and_resume_per_shard(tmp_path, monkeypatch):
    run, cfg, calls = RunDir(tmp_path, "r"), load_config(), []
    a, b = _specs(calls)
    with pytest.raises(StageInputError):
        run_stage(b, run, cfg)
    monkeypatch.setenv(FAULT_ENV, "a:2")
    with pytest.raises(InjectedFault):
        run_stage(a, run, cfg)
    assert calls == ["00000", "00001"] and stage_state(run, a, cfg) == "partial"
    monkeypatch.delenv(FAULT_ENV)
    m = run_stage(a, run, cfg)
    assert calls == ["00000", "00001", "00002"]  # only the missing shard was redone
    assert [o["path"] for o in m.outputs] == [f"stages/a/0000{i}.txt" for i in range(3)]
    run_stage(b, run, cfg)
    run_stage(a, run, cfg)
    run_stage(b, run, cfg)
    assert calls == ["00000", "00001", "00002", "second"]
    events = [(e["event"], e["stage"]) for e in run.events() if e["event"] in ("started", "completed", "skipped", "failed")]
    assert events == [("started", "a"), ("failed", "a"), ("started", "a"), ("completed", "a"), ("started", "b"),
                      ("completed", "b"), ("skipped", "a"), ("skipped", "b")]


def test_no_stage_starts_while_the_process_is_stopping(tmp_path, monkeypatch):
    """Ctrl-C as a stage ends: the stop (flows/interrupt.py) exits the process within seconds from its own
    thread; meanwhile the next stage neither starts nor is recorded as started."""
    from infra import stopping

    run, calls = RunDir(tmp_path, "r"), []
    a, _ = _specs(calls)
    monkeypatch.setattr(stopping, "HOLD_S", 0.2)
    stopping.STOPPING.set()
    try:
        with pytest.raises(RuntimeError, match=r"the process was stopping \(Ctrl-C or SIGTERM\) and did not exit "
                                               r"within 0.2 s"):
            run_stage(a, run, load_config())
    finally:
        stopping.STOPPING.clear()
    assert calls == [] and run.events() == [] and not run.stage_dir("a").exists()
    run_stage(a, run, load_config())
    assert calls == ["00000", "00001", "00002"]


def test_a_stage_cut_short_by_a_signal_the_process_stops_on_records_no_failure(tmp_path, monkeypatch):
    """Prefect's own SIGTERM handler (in a flow run a deployment started) raises TerminationSignal in the stage while
    the lvd handler stops the process: the stage has not failed, nothing says it did. Without a handler in effect the
    same exception is a failure, recorded at once."""
    from prefect.exceptions import TerminationSignal

    from infra import stopping

    def cut(ctx):
        stopping.STOPPING.set()  # (the handler's thread, as the signal arrives)
        raise TerminationSignal(signal=15)

    spec, run = StageSpec("a", ("dedup",), (), cut), RunDir(tmp_path, "r")
    monkeypatch.setattr(stopping, "HOLD_S", 0.2)
    stopping.HANDLED.set()
    try:
        with pytest.raises(RuntimeError, match=r"did not exit within 0\.2 s"):
            run_stage(spec, run, load_config())
    finally:
        stopping.HANDLED.clear()
        stopping.STOPPING.clear()
    assert [e["event"] for e in run.events()] == ["started"]
    with pytest.raises(TerminationSignal):
        run_stage(spec, run, load_config())
    stopping.STOPPING.clear()
    assert [(e["event"], e.get("error")) for e in run.events()][1:] == [("started", None), ("failed", "TerminationSignal: ")]


def test_config_change_invalidates_stage_and_downstream(tmp_path):
    run, calls = RunDir(tmp_path, "r"), []
    a, b = _specs(calls)
    run_stage(a, run, load_config())
    run_stage(b, run, load_config())
    cfg2 = load_config(None, ["dedup.k=8"])
    assert stage_state(run, a, cfg2) == "stale"
    run_stage(a, run, cfg2)
    assert stage_state(run, b, cfg2) == "stale"  # its upstream digest changed
    assert calls == ["00000", "00001", "00002", "second", "00000", "00001", "00002"]


def test_a_stage_computed_again_says_what_changed(tmp_path, caplog):
    """The console line and the `started` event of a stage that completed (or started) before under another key name
    what changed: its configuration, the code files that differ, the upstream stage, the files read from outside."""
    from dataclasses import replace

    from infra.manifest import read_manifest, write_manifest
    from infra.stage import KEY_FILE
    from infra.storage import atomic_write_json, read_json

    run, calls, outside = RunDir(tmp_path, "r"), [], {"list": "v1"}
    a, b = _specs(calls)
    a = replace(a, external=lambda cfg: outside["list"])
    here = "tests/infra/test_stage.py"

    def why(spec, cfg):
        caplog.clear()
        with caplog.at_level("INFO", logger="lvd"):
            run_stage(spec, run, cfg)
        started = [e for e in run.events() if e["event"] == "started" and e["stage"] == spec.name][-1]
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{spec.name}: started"))
        assert line == f"{spec.name}: started" + (f" ({started['why']})" if "why" in started else "")
        return started.get("why", "")

    cfg, cfg2 = load_config(), load_config(None, ["dedup.k=8"])
    assert why(a, cfg) == "" and why(b, cfg) == ""  # the first attempts
    assert why(a, cfg2) == "computed again: its configuration (dedup) changed since it completed"
    assert why(b, cfg2) == "computed again: upstream stage a changed since it completed"
    outside["list"] = "v2"
    assert why(a, cfg2) == "computed again: the files it reads from outside the run changed since it completed"
    # a came out byte for byte the same: b, which reads nothing else of it, stays complete.
    n_started = len([e for e in run.events() if e["event"] == "started"])
    run_stage(b, run, cfg2)
    assert len([e for e in run.events() if e["event"] == "started"]) == n_started and stage_state(run, b, cfg2) == "completed"
    def completed_by_other_code(detail):  # as an attempt with other code leaves the stage
        manifest = read_manifest(run.stage_dir("a")).model_copy(update={"code_version": "0" * 16, "key_detail": detail})
        write_manifest(run.stage_dir("a"), manifest)
        atomic_write_json(run.stage_dir("a") / KEY_FILE, {"key": manifest.key, "base": "", "parts": [
            manifest.config_hash, manifest.code_version, manifest.inputs_digest]})

    # Another code version: the files whose digest differs are named (this test's functions: this file).
    detail = read_manifest(run.stage_dir("a")).key_detail
    completed_by_other_code({**detail, "code": {**detail["code"], here: "0" * 16, "gone.py": "1" * 16}})
    assert why(a, cfg2) == f"computed again: its code changed (gone.py, {here}) since it completed"
    # A manifest of an older version, without the detail; an interrupted attempt of another key.
    completed_by_other_code({})
    assert why(a, cfg2) == "computed again: its code changed since it completed"
    (run.stage_dir("a") / "manifest.json").unlink()
    recorded = read_json(run.stage_dir("a") / KEY_FILE)
    parts = recorded["parts"]
    atomic_write_json(run.stage_dir("a") / KEY_FILE, {**recorded, "key": "a-0", "parts": [parts[0], "0", parts[2]]})
    assert why(a, cfg2) == "computed again: its code changed since its interrupted attempt"
    assert calls.count("00000") == 6



def test_a_shard_wise_stage_computes_again_only_the_shards_whose_inputs_changed(tmp_path, monkeypatch):
    """A stage with `salvage="upstream"` whose upstream changed: completed shards of its stale attempt whose upstream
    shard and extra inputs (the images it skips) are unchanged are taken over, files and counts, the others computed
    anew; files of shards that no longer exist go with the stale attempt. An attempt interrupted after taking over
    resumes; another configuration of the stage takes nothing."""
    from dataclasses import replace

    from infra.stage import INPUTS_KEY, previous_dir
    from infra.storage import Markers

    run, content, skip, calls = RunDir(tmp_path, "r"), {"00000": "a", "00001": "b", "00002": "c"}, {}, []

    def upstream(ctx):
        for shard in ctx.dir.glob("*.txt"):
            shard.unlink()
        for shard, text in content.items():
            (ctx.dir / f"{shard}.txt").write_text(text)
        return StageResult(outputs=sorted(ctx.dir.glob("*.txt")))

    def shardwise(ctx):
        names = sorted(p.stem for p in ctx.upstream_dir("a").glob("*.txt"))
        tracker = ctx.tracker(len(names), ctx.shard_inputs(names, ["a"], skip))
        for shard in names:
            def work(shard=shard):
                calls.append(shard)
                (ctx.dir / "out").mkdir(exist_ok=True)
                (ctx.dir / "out" / f"{shard}.txt").write_text((ctx.upstream_dir("a") / f"{shard}.txt").read_text().upper())
                return {"kept": len(calls)}
            tracker.run(shard, work)
        return StageResult(counts={"kept": sum(tracker.info(n)["kept"] for n in names)},
                           outputs=sorted((ctx.dir / "out").glob("*.txt")))

    def outputs():
        return {p.name: p.read_text() for p in (run.stage_dir("b") / "out").glob("*.txt")}

    a = StageSpec("a", ("dedup",), (), upstream, external=lambda cfg: repr(sorted(content.items())))
    b = StageSpec("b", ("corpus",), ("a",), shardwise, salvage="upstream")
    cfg = load_config()
    run_stage(a, run, cfg)
    assert run_stage(b, run, cfg).counts == {"kept": 1 + 2 + 3}
    assert set(Markers(run.stage_dir("b")).read("00000")) == {"kept", INPUTS_KEY}

    content.update({"00001": "B", "00003": "d"})  # one shard changed, one added, one gone
    del content["00002"]
    run_stage(a, run, cfg)
    assert stage_state(run, b, cfg) == "stale"
    monkeypatch.setenv(FAULT_ENV, "b:1")
    with pytest.raises(InjectedFault):  # 00000 taken over, 00001 computed, then the fault
        run_stage(b, run, cfg)
    monkeypatch.delenv(FAULT_ENV)
    assert calls[3:] == ["00001"] and outputs() == {"00000.txt": "A", "00001.txt": "B"}
    m = run_stage(b, run, cfg)  # resumed: the same attempt, the stale one still aside
    assert calls[3:] == ["00001", "00003"] and outputs() == {"00000.txt": "A", "00001.txt": "B", "00003.txt": "D"}
    assert m.counts == {"kept": 1 + 4 + 5}  # the counts of the shard taken over are its own
    assert [o["path"] for o in m.outputs] == [f"stages/b/out/0000{i}.txt" for i in (0, 1, 3)]
    assert not previous_dir(run, "b").exists()  # the gone shard's files with it
    events = [e for e in run.events() if e["event"] == "shards_taken_over"]
    assert [(e["stage"], e["shards"]) for e in events] == [("b", 1)]

    content["00003"] = "e"  # another shard changed, and 00000 skips an image it did not skip before
    skip["00000"] = {"image-x"}
    run_stage(a, run, cfg)
    run_stage(b, run, cfg)
    assert calls[5:] == ["00000", "00003"] and outputs() == {"00000.txt": "A", "00001.txt": "B", "00003.txt": "E"}

    calls.clear()  # another configuration of the stage: nothing to take
    run_stage(replace(b, sections=("corpus", "dedup")), run, load_config(None, ["dedup.k=8"]))
    assert calls == ["00000", "00001", "00003"]


def test_a_stage_another_run_completed_with_the_same_key_is_linked_not_computed(tmp_path, capsys):
    """Two runs under one root that differ downstream: the second takes the first's stage (same key) as its own,
    its files hard links, its manifest its own run id; a later write of either run's file (always a rename) leaves
    the other's alone. A donor whose output lost bytes is passed over; `run.reuse_runs: false` computes anyway."""
    import os

    from infra.history import attempts, describe
    from infra.manifest import read_manifest

    calls = []
    a, _ = _specs(calls)
    first, second, third = (RunDir(tmp_path, name) for name in ("r1", "r2", "r3"))
    run_stage(a, first, load_config())
    m = run_stage(a, second, load_config(None, ["corpus.shard_size=7"]))  # another configuration, downstream only
    assert calls == ["00000", "00001", "00002"]  # computed once
    assert m.run_id == "r2" and m.extra["reused_from"] == "r1" and m.digest() == read_manifest(first.stage_dir("a")).digest()
    one, two = first.stage_dir("a") / "00001.txt", second.stage_dir("a") / "00001.txt"
    assert os.stat(one).st_ino == os.stat(two).st_ino and two.read_text() == "00001 k=64"
    (second.stage_dir("a") / ".new.tmp").write_text("changed")
    os.replace(second.stage_dir("a") / ".new.tmp", two)  # how every stage writes
    assert one.read_text() == "00001 k=64"
    second.log_event("launched")  # (an attempt, as `lvd run` opens it)
    second.log_event("skipped", "a", from_run="r1")
    assert describe(attempts(second))[-1]["what"] == "reused (completed before): a (from run r1)"

    (first.stage_dir("a") / "00000.txt").write_text("")  # a donor that lost bytes: not taken
    run_stage(a, third, load_config())
    assert calls[3:] == ["00000", "00001", "00002"]
    calls.clear()
    run_stage(a, RunDir(tmp_path, "r4"), load_config(None, ["run.reuse_runs=false"]))
    assert calls == ["00000", "00001", "00002"]
