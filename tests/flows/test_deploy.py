"""`lvd serve` / the `lvd-run` flow (flows/deploy.py): a deployment's run is `lvd run` typed in the directory `lvd serve`
was typed in; a configuration with problems fails the flow run with every problem, before a run directory exists;
serving needs a Prefect server that stays up. (Served and triggered by hand with `prefect server start`,
`lvd serve` and `prefect deployment run`: docs/prefect.md.)"""

from __future__ import annotations

from pathlib import Path

from flows.cli import main as cli
from flows.deploy import lvd_run
from infra.manifest import read_manifest
from infra.run import RunDir

REPO = Path(__file__).resolve().parents[2]


def test_a_deployment_run_is_lvd_run_in_the_serving_directory(prefect_server, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the served process's directory is not the one the paths are relative to
    state = lvd_run(str(REPO / "configs" / "tiny.yaml"), ["run.root=runs", "run.stop_after=crawl"], str(tmp_path),
                    return_state=True)  # fmt: skip
    assert state.is_completed(), state.message
    summary = state.result()
    run = RunDir(tmp_path / "runs", summary["run_id"])
    assert run.path.is_dir() and not (REPO / "runs" / summary["run_id"]).exists()
    assert read_manifest(run.stage_dir("crawl")) is not None
    assert [r["state"] for r in summary["stages"] if r["stage"] == "crawl"] == ["completed"]


def test_a_configuration_with_problems_fails_the_flow_run_with_every_problem(prefect_server, tmp_path):
    state = lvd_run(str(REPO / "configs" / "own_folder.yaml"), [f"run.root={tmp_path / 'runs'}",
                    f"data.url_list={tmp_path / 'missing.parquet'}"], str(tmp_path), return_state=True)  # fmt: skip
    assert state.is_failed()
    assert f"data.url_list: {tmp_path / 'missing.parquet'} does not exist" in state.message, state.message
    assert not (tmp_path / "runs").exists()


def test_lvd_serve_needs_a_prefect_server_that_stays_up(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: ""}):
        assert cli(["serve", str(REPO / "configs" / "tiny.yaml")]) == 2
    assert "PREFECT_API_URL: lvd serve needs a Prefect server that stays up" in capsys.readouterr().err
