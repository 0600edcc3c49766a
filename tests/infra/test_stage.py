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
                (ctx.dir / f"{shard}.txt").write_text(shard)
                return {"kept": 1}
            tracker.run(shard, work)
        return StageResult(counts={"kept": 3}, outputs=sorted(ctx.dir.glob("*.txt")))

    def second(ctx):
        calls.append("second")
        return StageResult(counts={"kept": 1})

    return StageSpec("a", ("dedup",), ("infra",), (), first), StageSpec("b", ("corpus",), ("infra",), ("a",), second)


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
