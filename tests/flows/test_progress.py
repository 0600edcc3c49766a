"""A training stage's progress in Prefect: the artifact follows `progress.json` while training runs."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from flows.progress import TrainingProgress, describe


def _write(folder, step: int, total: int = 8) -> None:
    (folder / "progress.json").write_text(json.dumps({"step": step, "total": total, "images_per_second": 12.5}))


def _wait_for(reporter: TrainingProgress, percent: float) -> None:
    deadline = time.monotonic() + 30
    while percent not in reporter.reported:
        assert time.monotonic() < deadline, reporter.reported
        time.sleep(0.02)


def test_describe():
    assert describe({"step": 3, "total": 12, "images_per_second": 0}, "r1", "pretrain") == (
        25.0, "run r1, stage pretrain: step 3 of 12")
    assert describe({"step": 12, "total": 12, "images_per_second": 7.25}, "r1", "distill") == (
        100.0, "run r1, stage distill: step 12 of 12, 7.2 images/s")


def test_the_artifact_follows_the_training_and_ends_where_it_ended(tmp_path, prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    @flow
    def stage():
        _write(tmp_path, 2)  # a resumed run: starts where its checkpoint was
        with TrainingProgress(tmp_path, "r1", "pretrain_highres", interval_s=0.05) as reporter:
            _write(tmp_path, 4)
            _wait_for(reporter, 50.0)
            _write(tmp_path, 6)
            _wait_for(reporter, 75.0)
            _write(tmp_path, 8)
        return reporter.artifact, reporter.reported

    artifact_id, reported = stage()
    assert reported == [25.0, 50.0, 75.0, 100.0]

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))

    [artifact] = asyncio.run(read())
    assert artifact.key == "pretrain-highres-progress" and artifact.type == "progress"
    assert float(artifact.data) == 100.0
    assert artifact.description == "run r1, stage pretrain_highres: step 8 of 8, 12.5 images/s"


def test_without_a_prefect_run_training_goes_on(tmp_path, monkeypatch, caplog):
    import prefect.artifacts

    def refuse(*args, **kwargs):
        raise RuntimeError("no API")

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", refuse)
    with TrainingProgress(tmp_path, "r1", "pretrain") as reporter:
        _write(tmp_path, 8)
    assert reporter.artifact is None and reporter.reported == []
    assert "no Prefect progress artifact for pretrain: no API" in caplog.text


def test_training_in_child_processes_shows_its_progress_on_this_console(tmp_path, monkeypatch, caplog):
    """`train.devices` > 1: torchrun's children log into launch.log; the stage's process follows progress.json."""
    import logging

    import prefect.artifacts

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("no API")))  # the console goes on without Prefect
    caplog.set_level(logging.INFO, "lvd")

    def write(step: int, loss: float) -> None:
        (tmp_path / "progress.json").write_text(json.dumps({"step": step, "total": 8, "images_per_second": 3.0,
                                                            "loss": loss, "global_batch": 16}))

    write(2, 11.5)  # resumed at its checkpoint
    with TrainingProgress(tmp_path, "r1", "pretrain", interval_s=60, console=True, console_s=0.05) as reporter:
        deadline = time.monotonic() + 30
        while reporter.console is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        write(5, 10.25)
        while reporter.console.done < 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        write(8, 9.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "lvd"]
    assert re.fullmatch(r"pretrain: step 5/8, loss 10.25, [\d.,]+ images/s, ETA \d:\d\d:\d\d", lines[0]), lines
    assert re.fullmatch(r"pretrain: step 8/8 \(96 images; 2 done before\) in \d:\d\d:\d\d, [\d.,]+ images/s, "
                        r"loss 9.5", lines[-1]), lines


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
