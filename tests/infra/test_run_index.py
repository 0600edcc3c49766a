"""`lvd runs`, `lvd status` without an id (the latest run), and short run ids wherever a command takes a run id."""

from __future__ import annotations

import json
import shutil

import pytest

from flows.cli import main
from tests.evaluation.run_fixture import build_run

IDS = ("tiny-3a38676e", "tiny-3a99aaaa", "demo-12345678")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Three copies of the report's fixture run (completed, 6 images in the corpus, 80 % kNN), the last made later."""
    base = tmp_path_factory.mktemp("index")
    build_run(base / "built", IDS[0])
    for run_id in IDS:
        shutil.copytree(base / "built" / IDS[0], base / "runs" / run_id)
        (base / "runs" / run_id / "run.json").write_text(json.dumps({"run_id": run_id, "created": (
            "2026-11-23T09:30:00.000+00:00" if run_id.startswith("demo") else "2026-11-22T10:00:00.000+00:00")}))
    (base / "runs" / "demo-12345678" / "stages" / "evaluate" / "metrics.json").unlink()  # not evaluated (yet)
    return base / "runs"


def test_runs_lists_every_run_oldest_first(root, capsys):
    assert main(["runs", "--root", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "run            created (UTC)     state      corpus  kNN top-1 (20-NN)",
        "tiny-3a38676e  2026-11-22 10:00  completed       6  80.0 % (toy)",
        "tiny-3a99aaaa  2026-11-22 10:00  completed       6  80.0 % (toy)",
        "demo-12345678  2026-11-23 09:30  completed       6",
    ]
    assert main(["runs", "--root", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0] == {"run_id": "tiny-3a38676e", "created": "2026-11-22T10:00:00.000+00:00", "state": "completed",
                       "corpus": 6, "knn": {"benchmark": "toy", "top1_k20": 80.0}}


def test_status_without_an_id_shows_the_latest_run(root, capsys):
    assert main(["status", "--root", str(root)]) == 0
    assert capsys.readouterr().out.startswith(f"run demo-12345678  ({root / 'demo-12345678'})\n")


def test_a_prefix_naming_one_run_is_enough_everywhere(root, capsys):
    assert main(["status", "demo", "--root", str(root)]) == 0
    assert capsys.readouterr().out.startswith("run demo-12345678  (")
    assert main(["domains", "tiny-3a9", "--root", str(root), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3  # the fixture's 3 hosts
    assert main(["lineage", "tiny-3a3", "http://c.example/img/2.png", "--root", str(root)]) == 0
    assert "outcome: dropped at stage ingest: decode_error" in capsys.readouterr().out


def test_an_ambiguous_or_unknown_prefix_is_refused_with_the_candidates(root, capsys):
    assert main(["status", "tiny-3a", "--root", str(root)]) == 2
    assert capsys.readouterr().err == (f"error: 'tiny-3a' names 2 runs under {root}: tiny-3a38676e, tiny-3a99aaaa; "
                                       "give more of the id\n")
    assert main(["audit", "nope", "--root", str(root)]) == 2
    assert capsys.readouterr().err == (f"error: no run 'nope' under {root} (runs: demo-12345678, tiny-3a38676e, "
                                       "tiny-3a99aaaa)\n")
    assert main(["status", "--root", str(root / "empty")]) == 2
    assert capsys.readouterr().err == (f"error: no run under {root / 'empty'} yet: start one with `lvd run CONFIG`, or "
                                       "name its folder with --root\n")


def test_a_run_folder_given_as_a_path_names_that_run(root, capsys, monkeypatch):
    """`lvd status runs/demo-12345678/` (the shell completes the folder): the run, when it lies under --root; one
    under another folder is refused with the --root to give."""
    monkeypatch.chdir(root.parent)
    assert main(["status", "runs/demo-12345678/", "--root", "runs"]) == 0
    assert capsys.readouterr().out.startswith("run demo-12345678  (")
    assert main(["lineage", "./runs/tiny-3a38676e", "http://c.example/img/2.png", "--root", "runs"]) == 0
    assert "outcome: dropped at stage ingest: decode_error" in capsys.readouterr().out
    assert main(["status", "runs/tiny-3a99aaaa", "--root", "elsewhere"]) == 2
    assert capsys.readouterr().err == (f"error: runs/tiny-3a99aaaa is a run under {root}, not under elsewhere: give "
                                       f"--root {root} tiny-3a99aaaa\n")
