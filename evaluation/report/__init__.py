"""The run report: one self-contained HTML file per run, built from the run directory alone.

``build_report(run_dir)`` writes ``<run_dir>/report.html``: every figure is an SVG and every thumbnail a PNG
embedded as a data URI, and a Content-Security-Policy forbids any fetch, so the file opens anywhere offline.
Sections whose inputs are absent (a stage not run) say so instead of failing the report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from evaluation.report.sections import build_html

REPORT = "report.html"


def build_report(run_dir: Path, out: Path | None = None, blur: Callable[[bytes], bytes] | None = None) -> Path:
    """``blur``: face blurring for the images shown that are not pool images (which are shown as the faces stage
    stored them); without it those images are left out."""
    from infra.storage import atomic_write_text

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / REPORT
    atomic_write_text(out, build_html(run_dir, blur))
    return out


__all__ = ["REPORT", "build_report"]
