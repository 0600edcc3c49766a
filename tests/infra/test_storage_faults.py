"""Disk full and a read-only output directory, on a real size-limited filesystem (a tmpfs): the stage fails with a
clear error, earlier stages and the failed stage's committed work stay intact, and the run resumes once fixed.

The scenario runs in a child process in a private mount namespace (`unshare`), where it mounts its tmpfs: as root,
as any user where unprivileged user namespaces are allowed (`--user --map-root-user`), or through passwordless sudo.
Nothing is mounted on the host, and the mount goes away with the child. Where none of these works the test skips,
unless `LVD_REQUIRE_TMPFS=1` (set by `.ci/run`), which makes it fail instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
REQUIRE_ENV = "LVD_REQUIRE_TMPFS"
pytestmark = pytest.mark.slow
# Command prefixes that run a child in new mount and PID namespaces: its mounts never reach the host (propagation
# private), and whatever it leaves running (Prefect's embedded server) is killed when it exits.
NAMESPACES = ("--mount", "--pid", "--fork", "--mount-proc", "--kill-child")
LAUNCHERS = (
    ("unshare", *NAMESPACES),  # root
    ("unshare", "--user", "--map-root-user", *NAMESPACES),  # any user, where unprivileged user namespaces are allowed
    ("sudo", "-n", "--preserve-env", "unshare", *NAMESPACES),  # a user with passwordless sudo
)


def tmpfs_launcher(probe_dir: Path) -> tuple[str, ...]:
    """The first launcher whose child can mount a tmpfs (probed on ``probe_dir``); skip or fail when none can."""
    tried = []
    for prefix in LAUNCHERS:
        if shutil.which(prefix[0]) is None:
            tried.append(f"{prefix[0]}: not installed")
            continue
        probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=1m", "lvd-probe", str(probe_dir)],
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return prefix
        tried.append(f"{' '.join(prefix)}: {probe.stderr.strip() or f'exit {probe.returncode}'}")
    reason = "cannot mount a size-limited tmpfs here (" + "; ".join(tried) + ")"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 requires this test to run")
    pytest.skip(reason)


def mount_tmpfs(path: Path, size: str) -> None:
    """Inside the child's own mount namespace: unmounted when the child exits."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "lvd-test", str(path)], check=True)


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
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    prefix = tmpfs_launcher(mnt)
    code = "import sys; from tests.infra.test_storage_faults import disk_full_then_read_only as f; f(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}  # ingest's fan-out starts one (20 s by default)
    child = subprocess.run([*prefix, sys.executable, "-c", code, str(mnt)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=1200)
    assert child.returncode == 0, f"under {' '.join(prefix)}:\n{child.stdout[-3000:]}\n{child.stderr[-8000:]}"
    assert child.stdout.splitlines()[-1] == "disk full, read-only: failed clearly, resumed"


def disk_full_then_read_only(mount_point: str) -> None:
    """The scenario, in the child (a mount namespace where it may mount)."""
    mnt = Path(mount_point)
    mount_tmpfs(mnt, "64m")
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
    print("disk full, read-only: failed clearly, resumed")
