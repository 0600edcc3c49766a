"""Human-readable lineage: the chain of events of a URL or an image, ending with its terminal outcome."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def _detail(text: str | None) -> str:
    if not text:
        return ""
    d = json.loads(text)
    parts = []
    for k, v in d.items():
        if isinstance(v, str) and len(v) == 64:
            v = v[:12] + "…"  # image ids: the prefix is enough to read (and `lvd lineage` takes it)
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def describe_chain(chain: Sequence[Mapping[str, Any]], key: str) -> str:
    """``chain``: the events (dicts with the ledger's columns) in order, as `infra.lineage_lookup` returns them."""
    lines = [f"lineage of {key}"]
    urls = dict.fromkeys((e["row_id"], e["url"]) for e in chain if e["url"] is not None)
    for row, url in urls:
        lines.append(f"  input row {row}: {url}")
    for image in sorted({e["image_id"] for e in chain if e["image_id"] is not None}):
        lines.append(f"  image {image}")
    lines.append("")
    for e in chain:
        mark = {"drop": "DROPPED", "keep": "KEPT", "info": "·"}[e["kind"]]
        lines.append(f"  {e['stage']:<10} {mark:<8} {e['reason']:<20} {_detail(e['detail'])}")
    terminal = [e for e in chain if e["kind"] != "info"]
    lines.append("")
    if not terminal:
        lines.append("  outcome: no terminal outcome yet (the run has not finished)")
    for t in terminal:
        where = "kept in the corpus" if t["kind"] == "keep" else f"dropped at stage {t['stage']}: {t['reason']}"
        lines.append(f"  outcome: {where}")
    return "\n".join(lines)
