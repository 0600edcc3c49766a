"""A training stage's progress in Prefect: a progress artifact on the stage's task run, updated while it trains.

Training (in this process or in its torchrun children) writes `progress.json` in the stage folder with every metrics
flush (`training.callbacks.MetricsLogger`); a thread here reads it every `interval_s` seconds and updates the
artifact, so the Prefect UI (embedded server or `PREFECT_API_URL`) shows the percentage, the step and the images/s of
a long pretraining. Reporting never fails the stage: an error is logged once and reporting stops.

When training runs in child processes (`train.devices` > 1: torchrun, whose output goes to the stage's launch.log),
the same thread shows the training's progress on this process's console (`console=True`), every `console_s` seconds.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from uuid import UUID

from infra.console import Progress
from infra.storage import read_json
from training.callbacks import PROGRESS

log = logging.getLogger(__name__)


def read_progress(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / PROGRESS
    try:
        return read_json(path) if path.is_file() else None
    except ValueError:  # replaced atomically, but a reader may meet a file from an older, interrupted writer
        return None


def describe(progress: dict[str, Any], run_id: str, stage: str) -> tuple[float, str]:
    """(percent, description) of a `progress.json`."""
    step, total = int(progress["step"]), max(int(progress["total"]), 1)
    rate = progress.get("images_per_second") or 0.0
    speed = f", {rate:.1f} images/s" if rate else ""
    return min(100.0, 100.0 * step / total), f"run {run_id}, stage {stage}: step {step} of {total}{speed}"


class TrainingProgress:
    """`with TrainingProgress(stage_dir, run_id, stage): train(...)`: the artifact `<stage>-progress` (Prefect keys:
    lowercase letters, digits, dashes), created at 0 % (or where a resumed run stands) and updated until the end."""

    def __init__(self, out_dir: Path, run_id: str, stage: str, interval_s: float = 30.0, console: bool = False,
                 console_s: float = 5.0):
        self.out_dir, self.run_id, self.stage, self.interval_s = Path(out_dir), run_id, stage, interval_s
        self.key = f"{stage.replace('_', '-')}-progress"
        self.artifact: UUID | None = None
        self.reported: list[float] = []  # percentages sent, in order
        self.console: Progress | None = None
        self.period = min(interval_s, console_s) if console else interval_s
        self._console, self._stop = console, threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TrainingProgress:
        from prefect.artifacts import create_progress_artifact

        try:
            percent, text = self._current() or (0.0, f"run {self.run_id}, stage {self.stage}: starting")
            self.artifact = create_progress_artifact(percent, key=self.key, description=text)
            self.reported.append(percent)
        except Exception as e:  # no API, or outside a run: train without the artifact
            log.warning("no Prefect progress artifact for %s: %s", self.stage, e)
            if not self._console:
                return self
        context = contextvars.copy_context()  # the run's Prefect settings and client context, in the thread
        self._thread = threading.Thread(target=context.run, args=(self._loop,), daemon=True,
                                        name=f"{self.stage}-progress")
        self._thread.start()
        return self

    def _current(self) -> tuple[float, str] | None:
        progress = read_progress(self.out_dir)
        return None if progress is None else describe(progress, self.run_id, self.stage)

    def _show(self) -> None:
        """The console line of a training in child processes, from its `progress.json`."""
        progress = read_progress(self.out_dir)
        if progress is None:
            return
        step, loss = int(progress["step"]), progress.get("loss")
        if self.console is None:  # from the first step written on: a resumed training starts at its checkpoint
            self.console = Progress(self.stage, int(progress["total"]), unit="steps", done=step)
        if step > self.console.done:
            n = step - self.console.done
            self.console.advance(n, items=n * int(progress.get("global_batch") or 0),
                                 **({"loss": float(loss)} if loss is not None else {}))

    def _update(self) -> bool:
        from prefect.artifacts import update_progress_artifact

        current = self._current()
        if self.artifact is None or current is None or current[0] == self.reported[-1]:
            return True
        try:
            update_progress_artifact(self.artifact, current[0], description=current[1])
        except Exception as e:
            log.warning("Prefect progress artifact of %s not updated (reporting stops): %s", self.stage, e)
            return False
        self.reported.append(current[0])
        return True

    def _loop(self) -> None:
        reporting, last = True, time.monotonic()
        while not self._stop.wait(self.period):
            if self._console:
                self._show()
            if reporting and time.monotonic() - last >= self.interval_s - 1e-3:
                reporting, last = self._update(), time.monotonic()
            if not (reporting or self._console):
                return

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._update()  # where training ended (100 % when it finished)
        if self.console is not None:
            self._show()
            self.console.close(failed=error is not None)
