"""What a person sees while `lvd` works, and what reaches the flow run's logs in Prefect.

- One handler for the whole process (:func:`setup_console`): rich's on a terminal, plain timestamped lines otherwise
  (CI logs, `nohup`); Prefect's own console handler and Lightning's second one are replaced, so every event is one line.
- Progress (:class:`Progress`) for anything long: units done of the total (shards, steps, images), items/s, ETA and
  extra fields (a loss). On a terminal a rich progress bar; everywhere a plain line every `LVD_PROGRESS_INTERVAL`
  seconds (30 by default) and one when it ends, logged on the `lvd` logger so that Prefect's run logs show them too
  (on a terminal the console leaves the periodic ones to the bar).
- :func:`forward_to_prefect` sends the records of our loggers to the flow or task run they happen in (the UI's Logs tab).
- Third-party lines that say nothing about the run are dropped by exact message (:data:`NOISE`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import threading
import time
import warnings
from types import TracebackType
from typing import Any

from infra.errors import InputProblem, is_input_problem

OUR_LOGGERS = ("lvd", "flows", "curation", "training", "evaluation", "infra")
INTERVAL_ENV = "LVD_PROGRESS_INTERVAL"  # seconds between plain progress lines
MODE_ENV = "LVD_CONSOLE"  # "rich" or "plain": overrides the terminal detection
FORMAT = "%(asctime)s %(levelname)-7s %(origin)s%(message)s"  # origin: the logger's name, but ours ("lvd")
log = logging.getLogger("lvd")

# Lines third-party libraries print on every run that tell nothing about it, by logger and exact message.
NOISE: dict[str, frozenset[str]] = {
    # Lightning 2.6 advertises its cloud logger whenever a Trainer has no LitLogger (we log metrics ourselves).
    "lightning.pytorch.utilities.rank_zero": frozenset({
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing "
        "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics and artifacts "
        "automatically to the Lightning Experiments platform."}),
}


class NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in NOISE.get(record.name, ())


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(FORMAT, "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.origin = "" if record.name == "lvd" else f"{record.name}: "
        return super().format(record)


class StderrHandler(logging.StreamHandler):
    """A stream handler on whatever `sys.stderr` is when a record comes (pytest swaps it per test). (Its name must
    not start with `_`: Prefect's logging setup, run when prefect is first imported, replaces the root's handlers
    unless one of them is a user's, which it tells by the class name.)"""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.console: Any = None  # a rich Console on a terminal; None: plain lines
        self.handler: logging.Handler | None = None
        self.live: Any = None  # the rich Progress shown while tasks are open
        self.open = 0


_state = _State()


def interval() -> float:
    return float(os.environ.get(INTERVAL_ENV) or 30.0)


def _rich_console() -> Any:
    from rich.console import Console

    mode = os.environ.get(MODE_ENV, "").lower()
    console = Console(stderr=True, force_terminal=True if mode == "rich" else None)
    return console if mode != "plain" and console.is_terminal else None


def setup_console(level: int = logging.INFO) -> None:
    """Make the process's console one handler at the root (idempotent): our loggers at `level`, third parties at
    their own level (Lightning INFO, others WARNING), Python warnings as log lines."""
    with _state.lock:
        root = logging.getLogger()
        if _state.handler is None:
            _state.console = _rich_console()
            _state.handler = _console_handler(_state.console)
        for handler in list(root.handlers):
            if type(handler).__name__ == "PrefectConsoleHandler" or isinstance(handler, StderrHandler):
                root.removeHandler(handler)
        if _state.handler not in root.handlers:
            root.addHandler(_state.handler)
        for name in OUR_LOGGERS:
            logging.getLogger(name).setLevel(level)
        warnings.showwarning = _log_warning
    quiet_third_parties()


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
    """Python warnings as one log line each (`logging.captureWarnings` adds the source line and a blank one)."""
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)


def _console_handler(console: Any) -> logging.Handler:
    if console is not None:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False,
                                               log_time_format="%H:%M:%S")
        handler.addFilter(lambda r: not getattr(r, "lvd_progress", False))  # the bar shows them
    else:
        handler = StderrHandler()
        handler.setFormatter(PlainFormatter())
    handler.addFilter(NoiseFilter())
    # Prefect's own INFO lines (server started, task run created, state changes) belong in the run's logs in Prefect.
    handler.addFilter(lambda r: r.levelno >= logging.WARNING or not r.name.startswith("prefect"))
    handler.addFilter(_input_problem_filter)
    return handler


def _input_problem_filter(record: logging.LogRecord) -> bool:
    """Prefect's records of a task or flow run that failed on a problem with the user's input (`infra.errors`): the
    stage's own line and the command's last line already say it, without a traceback; Prefect's UI keeps them."""
    if not record.name.startswith("prefect") or record.levelno < logging.ERROR:
        return True
    if record.exc_info and is_input_problem(record.exc_info[1]):
        return False
    return not any(f"{name}:" in record.getMessage() or f"{name}(" in record.getMessage() for name in _input_names())


def _input_names() -> set[str]:
    """Class names of the input problems (a failed state's message names the class, not the object)."""
    names, todo = set(), [InputProblem]
    while todo:
        for sub in todo.pop().__subclasses__():
            names.add(sub.__name__)
            todo.append(sub)
    return names


def quiet_third_parties() -> None:
    """Filters that hold wherever the records go (console, Prefect, a test's capture); with our console set up, the
    handlers libraries add of their own at import. Called again once such a library is imported (training)."""
    for name in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoiseFilter) for f in logger.filters):
            logger.addFilter(NoiseFilter())
    if _state.handler is None:
        return
    # Lightning adds a stderr handler of its own to `lightning` at import and lets records propagate to the root as
    # well: each of its lines came twice (plain and timestamped). Imported before the root had a handler, its
    # `lightning.pytorch` / `lightning.fabric` loggers get one more each and stop propagating.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
            logger.propagate = True


def quiet_worker_console() -> None:
    """On a Dask or Ray worker process (no console of ours): Prefect's console handler shows warnings and errors only.
    Its INFO lines (each shard's task run state) go to the run's Prefect logs; on the worker's stderr, which a local
    cluster's workers share with `lvd`'s console, they came between our lines in Prefect's own format."""
    if _state.handler is not None:
        return
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and handler.level < logging.WARNING:
            handler.setLevel(logging.WARNING)


def forward_to_prefect(level: int = logging.INFO) -> None:
    """Send our loggers' records (and Lightning's) to the Prefect flow or task run they are logged in, once per
    process; records logged outside any run (e.g. `lvd status`) stay on the console only."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "flow_run_id", None) or FlowRunContext.get() or TaskRunContext.get():
                super().emit(record)

    with _state.lock:
        quiet_third_parties()
        for name in (*OUR_LOGGERS, "lightning"):
            logger = logging.getLogger(name)
            if not any(type(h).__name__ == "RunLogHandler" for h in logger.handlers):
                handler = RunLogHandler()
                handler.addFilter(NoiseFilter())
                logger.addHandler(handler)
            if logger.level == logging.NOTSET or logger.level > level:
                logger.setLevel(level)


# --- progress ---------------------------------------------------------------------------------------------------
def duration(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


def _rate(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


class Progress:
    """`with Progress("ingest", total=12, unit="shards", items="URLs") as p: ... p.advance(1, items=rows)`.

    `done`: units finished before (a resumed stage's shards, a training's checkpoint step); they count towards the
    total but not towards the rate. `total` may be None (unknown). `advance(..., **fields)` sets extra fields shown
    after the count (e.g. `loss=9.21`). Plain lines: at the first advance, then every `every` seconds, and a summary
    at the end; `quiet`: only the periodic ones (a part of a longer whole, e.g. one feature extraction)."""

    def __init__(self, name: str, total: int | None, unit: str = "shards", items: str = "images", done: int = 0,
                 every: float | None = None, quiet: bool = False, rate: bool = True):
        self.name, self.total, self.unit, self.items = name, total, unit, items
        self.before = done
        self.done, self.start_done, self.n_items, self.items_seen = done, done, 0, 0  # (rate: since `t0`)
        self.fields: dict[str, Any] = {}
        self.every = interval() if every is None else every
        self.t0 = self.created = time.monotonic()
        self.quiet, self.show_rate = quiet, rate
        self.last_line: float | None = self.created if quiet else None
        self.closed = False
        self._task = _open_task(self)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close(failed=err is not None)

    # what is shown
    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def rate(self) -> float:
        """Items (or units, without items) per second, over the units advanced in this process."""
        elapsed = self.elapsed
        n = self.n_items or (self.done - self.start_done)
        return n / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        advanced = self.done - self.start_done
        if self.total is None or advanced <= 0:
            return None
        return self.elapsed / advanced * max(self.total - self.done, 0)

    def count(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        if self.unit == "steps":
            return f"step {self.done}{of}"
        return f"{self.done}{of} {self.unit}"

    def info(self) -> str:
        """Extra fields, rate and ETA: what follows the count."""
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.fields.items()]
        if self.show_rate and self.done > self.start_done:
            parts.append(f"{_rate(self.rate)} {self.items if self.n_items else self.unit}/s")
        if (eta := self.eta) is not None and self.done < (self.total or 0):
            parts.append(f"ETA {duration(eta)}")
        return ", ".join(parts)

    def text(self) -> str:
        info = self.info()
        return f"{self.name}: {self.count()}" + (f", {info}" if info else "")

    # what is done
    def advance(self, n: int = 1, items: int = 0, **fields: Any) -> None:
        self.done += n
        self.n_items += items
        self.items_seen += items
        self.fields.update(fields)
        _update_task(self)
        if self.total is not None and self.done >= self.total and not self.quiet:
            return  # the summary says it when the caller closes
        if self.last_line is None or time.monotonic() - self.last_line >= self.every:
            self._line(periodic=True)

    def restart_clock(self) -> None:
        """Rate and ETA from here on (e.g. after a first step that includes start-up)."""
        self.t0, self.start_done, self.n_items = time.monotonic(), self.done, 0

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        _close_task(self)
        if not (failed or self.quiet):
            n = self.items_seen
            shown = self.show_rate and self.done > self.start_done
            speed = f", {_rate(self.rate)} {self.items if self.n_items else self.unit}/s" if shown else ""
            notes = [f"{n:,} {self.items}"] * bool(n) + [f"{self.before} done before"] * bool(self.before)
            fields = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in self.fields.items())
            log.info("%s: %s%s in %s%s%s", self.name, self.count(), f" ({'; '.join(notes)})" if notes else "",
                     duration(time.monotonic() - self.created), speed, fields)

    def _line(self, periodic: bool) -> None:
        self.last_line = time.monotonic()
        log.info("%s", self.text(), extra={"lvd_progress": periodic})


def _open_task(p: Progress) -> Any:
    with _state.lock:
        if _state.console is None:
            return None
        if _state.live is None:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            _state.live = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                       TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                                       TextColumn("{task.fields[info]}"), console=_state.console, transient=True)
            _state.live.start()
        _state.open += 1
        return _state.live.add_task(p.name, total=p.total, completed=p.done, unit=p.unit, info=p.info())


def _update_task(p: Progress) -> None:
    with _state.lock:
        if p._task is not None and _state.live is not None:
            _state.live.update(p._task, total=p.total, completed=p.done, info=p.info())


def _close_task(p: Progress) -> None:
    with _state.lock:
        if p._task is None or _state.live is None:
            return
        _state.live.remove_task(p._task)
        _state.open -= 1
        if _state.open == 0:
            _state.live.stop()
            _state.live = None
