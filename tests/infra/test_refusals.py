"""A configuration that cannot do what it says is refused before any work: one message listing every problem, exit 2
within seconds, no run directory, no stage (issue 21: a user's list silently replaced by the demo crawl, a runs folder
that cannot be written, retrieval without seed sets, an embedder that would be random)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.config import ConfigError
from infra.runs import prepare_run

REPO = Path(__file__).resolve().parents[2]
TINY, OWN = REPO / "configs" / "tiny.yaml", REPO / "configs" / "own_folder.yaml"


def _problems(config: Path, overrides: list[str]) -> list[str]:
    from flows.preflight import check_run_inputs

    with pytest.raises(ConfigError) as err:
        prepare_run(config, overrides, checks=check_run_inputs)  # as `lvd run` does
    return err.value.problems


def test_a_list_or_folder_given_beside_the_demo_and_an_unwritable_root_are_refused_together(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    problems = _problems(TINY, [f"data.url_list={tmp_path / 'mine.parquet'}", f"ingest.local_roots=[{tmp_path}]",
                                f"run.root={blocker / 'runs'}"])
    assert [p.split(":")[0] for p in problems] == ["data.url_list", "ingest.local_roots", "run.root"]
    assert "set demo.enabled=false" in problems[0] and f"({blocker} is not a folder)" in problems[2]
    assert not (blocker.parent / "runs").exists()


def test_retrieval_without_seed_sets_and_a_random_embedder_are_refused(tmp_path):
    urls = tmp_path / "urls.csv"
    urls.write_text("url\nhttp://example.com/a.jpg\n")
    problems = _problems(OWN, [f"data.url_list={urls}", f"run.root={tmp_path / 'runs'}", "retrieve.mode=seeds",
                               "embed.backbone.kind=vit", "embed.backbone.path=null"])
    assert [p.split(":")[0] for p in problems] == ["retrieve.mode", "embed.backbone"]
    assert "embed.allow_random_init=true" in problems[1]
    assert not (tmp_path / "runs").exists()


def test_an_existing_run_whose_url_list_is_gone_is_refused_before_its_flow_starts(tmp_path):
    """`lvd run` of a run made before (its configuration saved) checks the stages still to run: the list's ingest."""
    urls = tmp_path / "urls.csv"
    urls.write_text("url\nhttp://example.com/a.jpg\n")
    overrides = [f"data.url_list={urls}", f"run.root={tmp_path / 'runs'}", "embed.allow_random_init=true",
                 "embed.backbone.kind=vit", "embed.backbone.path=null"]
    run, _ = prepare_run(OWN, overrides, checks=None)  # the run exists, nothing computed
    urls.unlink()
    assert _problems(OWN, overrides) == [f"data.url_list: {urls} does not exist (the run's ingest has to run)"]
    assert run.exists()


def test_the_shipped_own_data_configs_name_a_model_file_and_are_refused_without_it(tmp_path, monkeypatch):
    urls = tmp_path / "urls.csv"
    urls.write_text("url\nhttp://example.com/a.jpg\n")
    monkeypatch.chdir(tmp_path)  # the configs' relative model path is taken from the command's directory, in full
    for config in (OWN, REPO / "configs" / "own_urls.yaml"):
        problems = _problems(config, [f"data.url_list={urls}", f"run.root={tmp_path / 'runs'}"])
        assert problems == [f"embed.backbone.path: {tmp_path / 'models' / 'dinov2_vits14_pretrain.pth'} does not exist"]


def test_a_url_list_without_its_url_column_is_refused_with_the_fix(tmp_path):
    """CC3M's TSV as published has no header line (img2dataset's docs add one with sed): found at start-up, with the
    fix, besides every other problem."""
    urls = tmp_path / "cc3m.tsv"
    urls.write_text("a cat\thttp://example.com/a.jpg\na dog\thttp://example.com/b.jpg\n")
    problems = _problems(OWN, [f"data.url_list={urls}", f"run.root={tmp_path / 'runs'}"])
    assert [p.split(":")[0] for p in problems] == ["data.url_list", "embed.backbone.path"]
    assert f"{urls}: no column 'url' (columns: ['a cat', 'http://example.com/a.jpg'])" in problems[0]
    assert "the file has no header line" in problems[0]
    assert not (tmp_path / "runs").exists()


def test_the_cli_refuses_in_seconds_with_every_problem_and_starts_nothing(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(OWN), f"run.root={tmp_path / 'runs'}",
                           "embed.backbone.kind=vit", "embed.backbone.path=null", "retrieve.mode=seeds"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("configuration is invalid (3 problems):")
    assert [line.split(":")[0].strip(" -") for line in proc.stderr.splitlines()[1:]] == [
        "data.url_list", "retrieve.mode", "embed.backbone"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "runs").exists()
    assert elapsed < 60, elapsed  # the interpreter and the schema only (seconds on an idle machine)


def _photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i}.jpg" for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(p, quality=90)
    return paths


def test_seed_and_evaluation_sets_are_read_before_any_stage_and_a_passed_split_is_remembered(tmp_path):
    """Before, a truncated evaluation image stopped the dedup stage after ingest and the filters, with Pillow's
    "image file is truncated" and no file name; an unlabelled evaluation split stopped the evaluate stage at the
    very end. Now each is refused at start-up with its key and file, and so is a seed folder without images; a
    split that passed is remembered until one of its files changes."""
    from flows.preflight import image_set_problems
    from infra.config import load_config

    urls = tmp_path / "urls.csv"
    urls.write_text("url\nhttp://example.com/a.jpg\n")
    ev = tmp_path / "ev"
    for split in ("train", "test"):
        for cls in ("cats", "dogs"):
            _photos(ev / split / cls, 3, seed=len(split) + len(cls))
    cut = ev / "test" / "dogs" / "1.jpg"
    whole = cut.read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    flat = _photos(tmp_path / "flat", 2)[0].parent  # images without class folders
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "IMG_1.CR2").write_bytes(b"raw")
    root = tmp_path / "runs"
    overrides = [f"data.url_list={urls}", f"run.root={root}", "embed.allow_random_init=true",
                 "embed.backbone.kind=vit", "embed.backbone.path=null",
                 f"data.eval_sets=[{{name: pets, train: {ev / 'train'}, test: {ev / 'test'}}}, "
                 f"{{name: flat, train: {flat}, test: {flat}}}]",
                 f"data.seed_sets=[{{name: mine, path: {seeds}}}]"]  # fmt: skip
    problems = _problems(OWN, overrides)
    assert [p.split(": ")[0] for p in problems] == [
        "data.eval_sets[pets].test", "data.eval_sets[flat].train", "data.eval_sets[flat].test",
        "data.seed_sets[mine].path"]  # fmt: skip
    assert problems[0].startswith("data.eval_sets[pets].test: 1 of 6 images cannot be decoded: dogs/1.jpg (OSError: "
                                  "image file is truncated")
    assert problems[1] == ("data.eval_sets[flat].train: 2 of 2 images have no class label (e.g. 0.jpg): a "
                           "classification split needs <split>/<class>/<image> (class sub-folders)")
    assert problems[3].startswith(f"data.seed_sets[mine].path: no images in {seeds} (image files: ")
    assert not root.exists()  # refused before anything was written

    cut.write_bytes(whole)
    _photos(seeds, 2)
    root.mkdir()  # as the first run made it
    pets = f"data.eval_sets=[{{name: pets, train: {ev / 'train'}, test: {ev / 'test'}}}]"
    cfg = load_config(OWN, [*overrides[:-2], pets, f"data.seed_sets=[{{name: mine, path: {seeds}}}]"])
    assert image_set_problems(cfg, remember=False) == []  # as `lvd run --dry-run` checks: nothing written
    assert not (root / ".cache").exists()
    assert image_set_problems(cfg) == []
    assert len(list((root / ".cache" / "sets").glob("*.json"))) == 3  # train, test, seeds: passed
    cut.write_bytes(whole[:-10])  # a file changed since: checked again, not taken from the cache
    assert [p.split(" (")[0] for p in image_set_problems(cfg)] == [
        "data.eval_sets[pets].test: 1 of 6 images cannot be decoded: dogs/1.jpg"]
    assert image_set_problems(cfg, stages={"ingest", "pretrain"}) == []  # no stage that reads the sets
