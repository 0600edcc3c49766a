"""Corpus: the composition table in the style of paper Table 15, exact values from a seed-stats table and a corpus
manifest (retrieval rows, "as is" rows, a set that retrieved images none of which survived, the total)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from curation.corpus import composition, markdown_table


def _stats() -> pd.DataFrame:
    """retrieve's seed_stats.parquet: one row per seed set."""
    cols = ["seed_set", "method", "queries", "n_neighbors", "hits", "retrieved", "collisions", "max_hits_per_image"]
    rows = [("in1k", "sample", 5, 32, 160, 100, 9, 3), ("small", "cluster", 10, None, 40, 40, 0, 1),
            ("curated", "as_is", 0, None, 0, 0, 0, 0), ("nn", "sample", 3, 4, 12, 12, 0, 1)]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def _corpus_table() -> pd.DataFrame:
    """corpus.parquet: 60 + 25 retrieved pool images, 7 images of an "as is" set, in1k's own 5 images as is."""
    sets = [("in1k", "sample")] * 60 + [("small", "cluster")] * 25 + [("curated", "as_is")] * 7 + [("in1k", "as_is")] * 5
    return pd.DataFrame([{"image_id": f"i{i}", "shard": f"{i // 50:05d}", "row_id": i if m != "as_is" else -1,
                          "source": "pool" if m != "as_is" else s, "seed_set": s, "method": m}
                         for i, (s, m) in enumerate(sets)])  # fmt: skip


def test_composition_exact_values() -> None:
    comp = composition(_corpus_table(), _stats())
    nan = np.nan
    expected = pd.DataFrame(
        [("curated", 7.0, "as is", nan, 7), ("in1k", 5.0, "as is", nan, 5), ("in1k", 5.0, "sample (k=32)", 100.0, 60),
         ("nn", 3.0, "sample (k=4)", 12.0, 0), ("small", 10.0, "cluster", 40.0, 25), ("total", nan, "", nan, 97)],
        columns=["dataset", "images", "retrieval", "retrieved", "final"],
    )  # fmt: skip
    pd.testing.assert_frame_equal(comp, expected)
    assert markdown_table(comp) == (
        "| dataset | images | retrieval | retrieved | final |\n|---|---|---|---|---|\n"
        "| curated | 7 | as is | – | 7 |\n| in1k | 5 | as is | – | 5 |\n| in1k | 5 | sample (k=32) | 100 | 60 |\n"
        "| nn | 3 | sample (k=4) | 12 | 0 |\n| small | 10 | cluster | 40 | 25 |\n| total | – |  | – | 97 |\n"
    )


def test_composition_of_an_empty_corpus() -> None:
    empty = pd.DataFrame(columns=["image_id", "shard", "row_id", "source", "seed_set", "method"])
    comp = composition(empty, _stats().iloc[[3]])
    assert comp[["dataset", "retrieval", "final"]].values.tolist() == [["nn", "sample (k=4)", 0], ["total", "", 0]]
    assert comp["retrieved"].tolist()[0] == 12.0
