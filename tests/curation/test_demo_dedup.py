"""The demo crawl's planted copies under the demo's dedup settings (configs/demo.yaml), scored against truth.parquet.

Ingest is emulated (decode, keep-ratio downscale to 128 px, JPEG q95, as the demo's ingest settings do) so the
test needs no HTTP server; the full flow asserts the same thing on the real ingest output (flows/stages._dedup).
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from curation.dedup import COMPONENTS, dedup
from curation.truth import assert_eval_copies_removed, score_dedup
from infra.config import load_config
from infra.config.data import DemoConfig, EvalSetConfig
from infra.demo.crawl import build_demo_crawl
from infra.stage import ShardTracker
from tests.curation.conftest import write_pool

REPO = Path(__file__).resolve().parents[2]


def _ingested(crawl: Path) -> tuple[list[bytes], pd.DataFrame]:
    truth = pd.read_parquet(crawl / "truth.parquet")
    truth = truth[(truth["kind"] != "broken")].reset_index(drop=True)
    items = []
    for name in truth["name"]:
        img = Image.open(crawl / "images" / name).convert("RGB")
        img.thumbnail((128, 128), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        items.append(buf.getvalue())
    return items, truth.assign(row_id=range(len(truth)))


@pytest.mark.slow
def test_demo_planted_copies_are_found_and_eval_copies_removed(tmp_path) -> None:
    crawl = tmp_path / "crawl"
    build_demo_crawl(crawl, DemoConfig(broken=False), port=1, seed=0)
    items, truth = _ingested(crawl)
    shards = write_pool(tmp_path / "pool", items, shard_size=1000)
    ev = EvalSetConfig(name="mnist", train=crawl / "eval" / "mnist" / "train", test=crawl / "eval" / "mnist" / "test")
    cfg = load_config(REPO / "configs" / "demo.yaml").dedup
    out = tmp_path / "dedup"
    dedup(shards, [ev], out, cfg, ShardTracker("dedup", out))
    report = score_dedup(pd.read_parquet(out / COMPONENTS), truth)
    assert_eval_copies_removed(report)
    assert report["eval_copies_removed"] == {v: {"removed": 8, "planted": 8} for v in ("crop", "exact", "flip", "jpeg", "resize")}
    assert report["near_dup_recall"] == {"crop": {"found": 37, "planted": 37}, "flip": {"found": 37, "planted": 37},
                                         "jpeg": {"found": 38, "planted": 38}, "resize": {"found": 38, "planted": 38}}  # fmt: skip
    # eval_threshold 0.992 also removes 5 distinct pool digits that look like evaluation digits (recorded, by design)
    assert (report["false_merge_components"], report["false_eval_drops"]) == (0, 5)
