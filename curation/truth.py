"""Dedup scored against what was planted in a crawl (the demo's ``truth.parquet``: kind, variant, of, name).

- near-duplicate recall per variant: the copy ended in the same component as its original;
- evaluation-copy removal per variant: a planted copy of an evaluation image did not survive dedup;
- false merges: components holding images of more than one origin (an image's origin is the original it was
  copied from, else itself), counted as components and as images beyond the first origin;
- false evaluation drops: pool images dropped as contamination that are not planted evaluation copies.
"""

from __future__ import annotations

from typing import Any

import pandas as pd


class PlantedCopiesSurvived(AssertionError):
    """Planted copies of evaluation images are still in the pool after relative dedup."""


def score_dedup(components: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """``components``: the dedup stage's components.parquet (row_id, representative, is_representative, eval_match)."""
    t = components.merge(truth[["row_id", "kind", "variant", "of", "name"]], on="row_id", how="left")
    rep_of_name = t.set_index("name")["representative"].to_dict()
    dups = t[t["kind"] == "near_dup"]
    recall = {}
    for variant, g in dups.groupby("variant"):
        found = (g["of"].map(rep_of_name) == g["representative"]) & g["of"].isin(rep_of_name.keys())
        recall[variant] = {"found": int(found.sum()), "planted": len(g)}
    removed = ~(t["is_representative"] & t["eval_match"].isna())
    copies = t[t["kind"] == "eval_copy"]
    eval_removed = {v: {"removed": int(removed[g.index].sum()), "planted": len(g)} for v, g in copies.groupby("variant")}
    origin = t["of"].where(t["kind"] == "near_dup", t["name"])
    per_comp = origin.groupby(t["representative"]).nunique()
    false_eval = t["eval_match"].notna() & t["is_representative"] & (t["kind"] != "eval_copy")
    return {
        "near_dup_recall": recall,
        "eval_copies_removed": eval_removed,
        "false_merge_components": int((per_comp > 1).sum()),
        "false_merge_images": int((per_comp - 1).clip(lower=0).sum()),
        "false_eval_drops": int(false_eval.sum()),
        "surviving_eval_copies": sorted(copies.loc[~removed[copies.index], "name"].tolist()),
    }


def assert_eval_copies_removed(report: dict[str, Any]) -> None:
    if report["surviving_eval_copies"]:
        raise PlantedCopiesSurvived(
            f"{len(report['surviving_eval_copies'])} planted copies of evaluation images survived dedup: "
            f"{report['surviving_eval_copies'][:10]}; lower dedup.eval_threshold or add descriptor views"
        )
