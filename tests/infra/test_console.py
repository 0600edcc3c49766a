"""The console: progress lines (units of the total, rate, ETA), one handler, third-party noise dropped by message."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from infra import console
from infra.console import Progress

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def _lines(caplog) -> list[tuple[str, bool]]:
    return [(r.getMessage(), getattr(r, "lvd_progress", False)) for r in caplog.records if r.name == "lvd"]


def test_shard_progress_lines_first_then_every_interval_then_a_summary(clock, caplog):
    caplog.set_level(logging.INFO, "lvd")
    with Progress("ingest", 5, "shards", items="URLs", done=1, every=10) as p:  # one shard done by an earlier attempt
        for t, rows in ((102, 100), (105, 100), (113, 100), (114, 50)):
            clock[0] = t
            p.advance(1, items=rows)
    assert _lines(caplog) == [
        ("ingest: 2/5 shards, 50.0 URLs/s, ETA 0:00:06", True),  # 1 shard in 2 s, 3 to go
        ("ingest: 4/5 shards, 23.1 URLs/s, ETA 0:00:04", True),  # 10 s after the first line: 300 URLs in 13 s
        ("ingest: 5/5 shards (350 URLs; 1 done before) in 0:00:14, 25.0 URLs/s", False),
    ]


def test_training_progress_shows_the_step_loss_and_images_per_second(clock, caplog):
    caplog.set_level(logging.INFO, "lvd")
    p = Progress("pretrain", 10, unit="steps", done=4, every=0)  # resumed at its checkpoint's step 4
    clock[0] = 104.0
    p.advance(1, items=32, loss=11.23456)
    p.restart_clock()  # as ConsoleProgress does after the first step (start-up)
    clock[0] = 106.0
    p.advance(2, items=64, loss=10.5)
    p.close()
    assert _lines(caplog) == [
        ("pretrain: step 5/10, loss 11.23, 8.0 images/s, ETA 0:00:20", True),
        ("pretrain: step 7/10, loss 10.5, 32.0 images/s, ETA 0:00:03", True),
        ("pretrain: step 7/10 (96 images; 4 done before) in 0:00:06, 32.0 images/s, loss 10.5", False),
    ]


def test_a_failed_or_quiet_progress_ends_without_a_summary(clock, caplog):
    caplog.set_level(logging.INFO, "lvd")
    with pytest.raises(RuntimeError), Progress("nsfw", 3, every=60) as p:
        clock[0] = 101.0
        p.advance(1, items=10)
        raise RuntimeError("shard failed")
    with Progress("features of pretrained", 512, unit="images", quiet=True, every=60) as q:
        q.advance(256)
    assert _lines(caplog) == [("nsfw: 1/3 shards, 10.0 images/s, ETA 0:00:02", True)]


CHILD = """
import logging, warnings
from infra.console import setup_console
setup_console()
import lightning as L, prefect  # imported after the console is set up, as `lvd` imports them
from infra.console import quiet_third_parties
quiet_third_parties()  # what pretrain() does
L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
logging.getLogger("prefect.flow_runs").info("Beginning flow run")  # the run's logs in Prefect, not the console
logging.getLogger("curation.ingest").info("a stage's own line")
logging.getLogger("lvd").info("ingest: 1/4 shards", extra={"lvd_progress": True})
warnings.warn("a warning from a library")
"""


def test_one_line_per_event_and_no_advertisement_on_a_plain_console():
    env = {**os.environ, "PYTHONPATH": str(REPO), "LVD_CONSOLE": "plain"}
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in out.stderr.splitlines()]
    assert lines == [
        "INFO    lightning.pytorch.utilities.rank_zero: GPU available: False, used: False",
        "INFO    lightning.pytorch.utilities.rank_zero: TPU available: False, using: 0 TPU cores",
        "INFO    curation.ingest: a stage's own line",
        "INFO    ingest: 1/4 shards",
        "WARNING py.warnings: UserWarning: a warning from a library (<string>:12)",
    ], out.stderr
    assert out.stdout == ""


RICH_CHILD = """
import logging, time
from infra.console import Progress, setup_console
setup_console()
with Progress("ingest", 4, "shards", items="URLs", every=0) as p:
    for _ in range(4):
        time.sleep(0.25)  # (the display refreshes 10 times a second)
        p.advance(1, items=80)
        logging.getLogger("curation.ingest").warning("shard done")
"""


def test_on_a_terminal_progress_is_a_live_bar_and_log_lines_print_above_it():
    env = {**os.environ, "PYTHONPATH": str(REPO), "LVD_CONSOLE": "rich", "COLUMNS": "100", "TERM": "xterm"}
    out = subprocess.run([sys.executable, "-c", RICH_CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.stderr)  # the terminal's control sequences
    bars = re.findall(r"ingest [━╺╸]+ (\d)/4 shards \d:\d\d:\d\d ?(.*?) *$", text, re.MULTILINE)
    assert {n for n, _ in bars} >= {"0", "1", "2", "3"}, text
    # A bar drawn at 4/4 (a refresh between the last advance and the close: a matter of timing) has no ETA left.
    assert all(re.fullmatch(r"[\d,.]+ URLs/s" + (r", ETA 0:00:\d\d" if n != "4" else ""), info)
               for n, info in bars if n != "0"), bars
    assert text.count("WARNING  shard done") == 4  # printed above the bar, once each
    assert "ingest: 1/4 shards, " not in text  # the plain periodic lines are the bar's on a terminal
    assert re.search(r"INFO     ingest: 4/4 shards \(320 URLs\) in \d:\d\d:\d\d, [\d,.]+ URLs/s", text), text


def test_the_console_shows_an_input_problem_without_prefects_traceback():
    """Prefect logs a failed task run with its traceback; for an error in what the user gave, the stage's own line
    says it, so the console leaves Prefect's records out (a bug's traceback stays)."""
    import logging

    from infra.console import _input_problem_filter
    from infra.datasets import DatasetError

    def record(name: str, err: BaseException | None, msg: str = "Task run failed with exception") -> logging.LogRecord:
        info = (type(err), err, None) if err is not None else None
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, (), info)

    assert not _input_problem_filter(record("prefect.task_runs", DatasetError("x.jpg cannot be decoded")))
    wrapped = RuntimeError("stage failed")
    wrapped.__cause__ = DatasetError("x")
    assert not _input_problem_filter(record("prefect.flow_runs", wrapped))
    assert _input_problem_filter(record("prefect.task_runs", KeyError("seed_set")))  # a bug: its traceback shows
    assert not _input_problem_filter(record("prefect.task_runs", None, "Finished in state Failed('Task run encountered "
                                                                      "an exception DatasetError: x.jpg')"))
    assert _input_problem_filter(record("lvd", DatasetError("x")))  # our own line
