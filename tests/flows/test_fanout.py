"""Per-shard task runs: retries after a failure and a wall-clock limit per attempt (`run.shard_*`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flows.fanout import prefect_mapper
from infra.config.run import RunConfig


def _attempt(counter: Path) -> int:
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    return n


def flaky(counter: Path, fails: int) -> int:
    """Fails its first `fails` attempts (a transient error), then returns the attempt number."""
    n = _attempt(counter)
    if n < fails:
        raise OSError(f"transient failure {n}")
    return n


def hangs_first(counter: Path, seconds: float) -> int:
    """The first attempt spins for `seconds` (a hung shard), later ones return at once."""
    n = _attempt(counter)
    start = time.monotonic()
    while n == 0 and time.monotonic() - start < seconds:
        time.sleep(0.01)
    return n


def test_shard_retries(tmp_path, prefect_server):
    run = RunConfig(shard_retries=2, shard_retry_delay_s=0)
    assert list(prefect_mapper(run, "t")(flaky, [(tmp_path / "a", 2)])) == [2]  # third attempt succeeds
    with pytest.raises(OSError, match="transient failure 1"):  # attempts spent: the stage sees the shard's error
        list(prefect_mapper(RunConfig(shard_retries=1, shard_retry_delay_s=0), "t")(flaky, [(tmp_path / "b", 2)]))
    assert (tmp_path / "b").read_text() == "2"
    with pytest.raises(OSError, match="transient failure 0"):  # default: no retry
        list(prefect_mapper(RunConfig(), "t")(flaky, [(tmp_path / "c", 1)]))


def test_shard_timeout_fails_then_retries_a_hung_shard(tmp_path, prefect_server):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out"):
        list(prefect_mapper(RunConfig(shard_timeout_s=0.5), "t")(hangs_first, [(tmp_path / "a", 60.0)]))
    assert time.monotonic() - start < 30  # not the 60 s the attempt would have spun
    run = RunConfig(shard_timeout_s=0.5, shard_retries=1, shard_retry_delay_s=0)
    assert list(prefect_mapper(run, "t")(hangs_first, [(tmp_path / "b", 60.0)])) == [1]
