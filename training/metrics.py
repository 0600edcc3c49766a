"""Per-step metrics as CSV, written atomically.

Rows live in segment files `metrics/<first step>.csv` of at most `segment_rows` rows; a flush rewrites only the
open segment (atomically), so logging stays O(rows) over a long run. `consolidate` writes the single
`metrics.csv` (atomically) from the segments; `truncate(step)` drops rows at or after a resume step, so a resumed
run does not repeat the rows its interrupted predecessor wrote after the last checkpoint.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from infra.storage import atomic_write_text


def _to_csv(header: list[str], rows: list[dict[str, Any]], with_header: bool = True) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    if with_header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str) -> Any:
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


class MetricsWriter:
    def __init__(self, out_dir: Path, segment_rows: int = 1000):
        self.out_dir = Path(out_dir)
        self.seg_dir = self.out_dir / "metrics"
        self.segment_rows = segment_rows
        self.rows: list[dict[str, Any]] = []  # the open segment
        self.header: list[str] | None = None

    @property
    def csv_path(self) -> Path:
        return self.out_dir / "metrics.csv"

    def _segments(self) -> list[Path]:
        return sorted(self.seg_dir.glob("*.csv")) if self.seg_dir.is_dir() else []

    def truncate(self, step: int) -> None:
        """Keep rows with step < `step` (called when resuming from a checkpoint taken after `step` steps)."""
        for seg in self._segments():
            rows = [r for r in read_csv(seg) if int(r["step"]) < step]
            if not rows:
                seg.unlink()
            else:
                atomic_write_text(seg, _to_csv(list(rows[0]), rows))
        self.rows = []

    def log(self, row: dict[str, Any]) -> None:
        if self.header is None:
            self.header = list(row)
        self.rows.append(row)
        if len(self.rows) >= self.segment_rows:
            self.flush()
            self.rows = []

    def flush(self) -> None:
        if self.rows and self.header is not None:
            atomic_write_text(self.seg_dir / f"{int(self.rows[0]['step']):09d}.csv", _to_csv(self.header, self.rows))

    def consolidate(self) -> Path:
        self.flush()
        parts, header = [], None
        for seg in self._segments():
            text = seg.read_text()
            first, _, body = text.partition("\n")
            header = header or first
            parts.append(body)
        atomic_write_text(self.csv_path, (header + "\n" if header else "") + "".join(parts))
        return self.csv_path
