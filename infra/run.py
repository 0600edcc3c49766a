"""Run directories: identity, layout and the event log."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

from infra.config import ConfigError, PipelineConfig, config_hash, parse_yaml, to_yaml, validate

CONFIG_FILE = "config.yaml"
EVENTS_FILE = "events.jsonl"


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def derive_run_id(config_path: Path | None, cfg: PipelineConfig) -> str:
    """``<config name>-<hash of the whole config>``: the same configuration maps to the same run."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(config_path).stem) if config_path else "run"
    return f"{stem}-{config_hash(cfg)[:8]}"


class RunDir:
    """``<root>/<run_id>/``: config.yaml, events.jsonl and ``stages/<stage>/`` for every stage."""

    def __init__(self, root: Path, run_id: str):
        # Absolute: a stage's files are named the same in the flow's process and on a Dask or Ray worker, whose
        # working directory is its own.
        self.root = Path(os.path.abspath(root))
        self.run_id = run_id
        self.path = self.root / run_id

    def stage_dir(self, stage: str) -> Path:
        return self.path / "stages" / stage

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def events_path(self) -> Path:
        return self.path / EVENTS_FILE

    def exists(self) -> bool:
        return self.config_path.is_file()

    def load_config(self) -> PipelineConfig:
        if not self.exists():
            raise FileNotFoundError(f"no run {self.run_id!r} under {self.root} (missing {self.config_path})")
        return validate(parse_yaml(self.config_path.read_text()), str(self.config_path))

    def save_config(self, cfg: PipelineConfig) -> None:
        """Write the resolved config; an existing run keeps its config (a different one is an error)."""
        from infra.storage import atomic_write_text

        if self.exists():
            old = self.load_config()
            if config_hash(old) != config_hash(cfg):
                raise ConfigError(
                    [f"run {self.run_id!r} exists with a different configuration; use another run.run_id"],
                    str(self.config_path),
                )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, to_yaml(cfg))

    def log_event(self, event: str, stage: str | None = None, **fields: Any) -> None:
        """Append one JSON line; O_APPEND keeps concurrent writers' lines whole."""
        record = {"time": now(), "run_id": self.run_id, "event": event, "stage": stage, **fields}
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # (less the umask)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.is_file():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
        return out
