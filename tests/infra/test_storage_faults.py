"""Disk full and a read-only output directory, on a real size-limited filesystem (a tmpfs): the stage fails with a
clear error, earlier stages and the failed stage's committed work stay intact, and the run resumes once fixed."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.pipeline import demo_server
from flows.stages import active_stages
from infra.manifest import read_manifest
from infra.run import RunDir
from infra.runs import prepare_run
from infra.stage import StageStorageError, run_stage
from infra.storage import sha256_file

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "lvd-test", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(mount: Path, leave: int) -> Path:
    """Write real bytes until only ``leave`` bytes are free (tmpfs does not count holes)."""
    ballast = mount / "ballast"
    with open(ballast, "wb") as f:
        while (free := os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize) > leave:
            f.write(b"\0" * min(1 << 20, max(free - leave, 4096)))
            f.flush()
    return ballast


def intact(run: RunDir, stage: str) -> bool:
    manifest = read_manifest(run.stage_dir(stage))
    return manifest is not None and all(sha256_file(run.path / o["path"]) == o["sha256"] for o in manifest.outputs)


def test_disk_full_then_read_only_fail_clearly_and_resume(tmp_path):
    with tmpfs(tmp_path / "mnt", "64m") as mnt:
        run, cfg = prepare_run(REPO / "configs" / "tiny.yaml", [f"run.root={mnt}"])
        specs = {s.name: s for s in active_stages(cfg)}
        crawl = run_stage(specs["crawl"], run, cfg)

        ballast = fill(mnt, leave=64 << 10)
        with pytest.raises(StageStorageError, match=r"stage 'ingest' cannot write its outputs: .*No space left on "
                                                    r"device.*lvd resume"), demo_server(specs["ingest"], run, cfg):
            run_stage(specs["ingest"], run, cfg)
        assert read_manifest(run.stage_dir("crawl")) == crawl and intact(run, "crawl")
        assert read_manifest(run.stage_dir("ingest")) is None

        ballast.unlink()
        with demo_server(specs["ingest"], run, cfg):
            ingest = run_stage(specs["ingest"], run, cfg)
        assert ingest.counts["rows"] == crawl.counts["rows"] and intact(run, "ingest")
        assert not list(run.path.rglob(".*.tmp"))  # leftovers of the failed attempt are gone

        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        try:
            with pytest.raises(StageStorageError, match=r"stage 'nsfw' cannot write its outputs: Read-only file system"):
                run_stage(specs["nsfw"], run, cfg)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        assert intact(run, "crawl") and intact(run, "ingest")
        assert run_stage(specs["nsfw"], run, cfg).counts["scored"] == ingest.counts["kept"]
