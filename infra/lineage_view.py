"""Human-readable lineage: the chain of events of a URL or an image, ending with its terminal outcome."""

from __future__ import annotations

import json

import pandas as pd


def _detail(text: str | None) -> str:
    if not text:
        return ""
    d = json.loads(text)
    parts = []
    for k, v in d.items():
        if isinstance(v, str) and len(v) == 64:
            v = v[:12] + "…"  # image ids: the prefix is enough to read
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def describe_chain(chain: pd.DataFrame, key: str) -> str:
    lines = [f"lineage of {key}"]
    urls = chain.loc[chain["url"].notna(), ["row_id", "url"]].drop_duplicates()
    for r in urls.itertuples(index=False):
        lines.append(f"  input row {int(r.row_id)}: {r.url}")
    ids = sorted(set(chain["image_id"].dropna()))
    for i in ids:
        lines.append(f"  image {i}")
    lines.append("")
    for r in chain.itertuples(index=False):
        mark = {"drop": "DROPPED", "keep": "KEPT", "info": "·"}[r.kind]
        lines.append(f"  {r.stage:<10} {mark:<8} {r.reason:<20} {_detail(r.detail)}")
    terminal = chain[chain["kind"] != "info"]
    lines.append("")
    if terminal.empty:
        lines.append("  outcome: no terminal outcome yet (the run has not finished)")
    for t in terminal.itertuples(index=False):
        where = "kept in the corpus" if t.kind == "keep" else f"dropped at stage {t.stage}: {t.reason}"
        lines.append(f"  outcome: {where}")
    return "\n".join(lines)
