"""retry-failed at the core: only failed URLs are fetched again, into new shards; the ledger supersedes."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curation.ingest import failed_rows, ingest, retry_failed
from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig
from infra.demo.server import DemoServer, free_port
from infra.lineage import Ledger, check_terminal_outcomes
from infra.shards import list_shards
from infra.stage import ShardTracker


def _png(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def crawl(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"g{i}.png").write_bytes(_png(i))
    port = free_port()
    b = f"http://127.0.0.1:{port}"
    paths = ["/img/g0.png", "/img/g1.png", "/status/404/x.png", "/fail-first/1/g3.png", "/img/g2.png"]
    pd.DataFrame({"url": [b + p for p in paths]}).to_parquet(tmp_path / "urls.parquet")
    return tmp_path, port, paths


def test_retry_fetches_only_failed_urls_into_a_new_shard(crawl, loopback_only):
    root, port, paths = crawl
    stage = root / "run" / "stages" / "ingest"
    cfg = IngestConfig(shard_size=3, threads=4, timeout=2, allow_hosts=["127.0.0.1"], phash_dedup=False)
    tracker = ShardTracker("ingest", stage)
    with DemoServer(root / "images", port) as server:
        first = ingest(DataConfig(url_list=root / "urls.parquet"), stage, cfg, tracker)
        assert first.counts["dropped"] == {"http_404": 1, "http_500": 1} and first.counts["kept"] == 3
        assert failed_rows(stage)[["row_id", "reason"]].values.tolist() == [[3, "http_500"]]
        plan, result = retry_failed(stage, cfg, tracker)
        hits = dict(server.hits)
    assert hits == {p: 1 for p in paths} | {"/fail-first/1/g3.png": 2}  # nothing else was downloaded again
    assert (plan.attempt, [j.name for j in plan.jobs]) == (1, ["r1-00001"])
    assert [s.name for s in list_shards(stage / "shards")] == ["00000", "00001", "r1-00001"]
    new = list_shards(stage / "shards")[2].read_table()
    assert new["row_id"].tolist() == [3] and new["url"].tolist() == [f"http://127.0.0.1:{port}/fail-first/1/g3.png"]
    assert result.counts["dropped"] == {"http_404": 1} and result.counts["kept"] == 4
    assert result.counts["retried"] == 1 and result.counts["rows"] == 5

    ledger = Ledger(root / "run")
    chain = ledger.chain(url=f"http://127.0.0.1:{port}/fail-first/1/g3.png")
    assert chain[["kind", "reason", "attempt"]].values.tolist() == [
        ["info", "input", 0], ["drop", "http_500", 0], ["info", "retry", 1], ["info", "downloaded", 1]]  # fmt: skip
    check = check_terminal_outcomes(ledger)
    assert check.dropped == {"ingest:http_404": 1}  # the superseded http_500 no longer counts
    assert check.multiple == [] and check.missing == [0, 1, 3, 4]  # downloaded: their outcome comes later


def test_retry_reason_filter_and_refusals(crawl):
    root, port, _paths = crawl
    stage = root / "run" / "stages" / "ingest"
    cfg = IngestConfig(shard_size=3, threads=4, timeout=2, allow_hosts=["127.0.0.1"], phash_dedup=False)
    tracker = ShardTracker("ingest", stage)
    with DemoServer(root / "images", port) as server:
        ingest(DataConfig(url_list=root / "urls.parquet"), stage, cfg, tracker)
        plan, _ = retry_failed(stage, cfg, tracker, reasons=["http_4*"])
        again, result = retry_failed(stage, cfg, tracker, reasons=["http_4*"])
        hits = dict(server.hits)
    assert plan.rows["row_id"].tolist() == [2] and [j.name for j in plan.jobs] == ["r1-00000"]
    assert again.rows["row_id"].tolist() == [2] and [j.name for j in again.jobs] == ["r2-00000"]
    assert hits["/status/404/x.png"] == 3 and hits["/fail-first/1/g3.png"] == 1
    assert result.counts["dropped"] == {"http_404": 1, "http_500": 1}
    assert check_terminal_outcomes(Ledger(root / "run")).dropped == {"ingest:http_404": 1, "ingest:http_500": 1}
    with pytest.raises(ValueError, match=r"\['url_private'\] are decided without downloading"):
        failed_rows(stage, ["url_private"])
