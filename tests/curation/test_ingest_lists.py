"""A URL list cut short by a failed copy: CSV and JSONL lists are ingested, the cut row ends in a recorded
``list_row_malformed`` drop and every row in exactly one outcome; a cut parquet list stops before any download with
the file and the fix named."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curation.ingest import ingest
from curation.urls import UrlListError
from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig
from infra.demo.server import DemoServer, free_port
from infra.lineage import Ledger
from infra.stage import ShardTracker
from tests.curation.conftest import png

CFG = dict(shard_size=3, threads=4, timeout=2, allow_hosts=["127.0.0.1"])
PATHS = ["/img/g0.png", "/status/404/x.png", "/img/g0.png", "http://10.0.0.1/a.png", "/img/g1.png"]


def _list(root, fmt, port):
    urls = [p if p.startswith("http") else f"http://127.0.0.1:{port}{p}" for p in PATHS]
    df = pd.DataFrame({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]})
    path = root / f"urls.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    text = path.read_text()
    cut = text.rindex("/img/g1") + len("/img/g")  # a failed copy stops inside the last row's URL
    path.write_text(text[:cut])
    return path, urls[-1][: urls[-1].index("/img/g1") + len("/img/g")]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_truncated_list_ends_in_a_recorded_drop(tmp_path, fmt, loopback_only):
    (tmp_path / "images").mkdir()
    for i in range(2):
        (tmp_path / "images" / f"g{i}.png").write_bytes(png(Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8))))
    port = free_port()
    path, cut_url = _list(tmp_path, fmt, port)
    stage = tmp_path / "run" / "stages" / "ingest"
    with DemoServer(tmp_path / "images", port) as server:
        result = ingest(DataConfig(url_list=path), stage, IngestConfig(**CFG), ShardTracker("ingest", stage))
        hits = dict(server.hits)
    assert hits == {"/img/g0.png": 1, "/status/404/x.png": 1}  # the cut row is never fetched
    ev = Ledger(tmp_path / "run").events()
    assert sorted(ev.loc[ev["reason"] == "input", "row_id"]) == [0, 1, 2, 3, 4]
    outcome = ev[(ev["kind"] == "drop") | (ev["reason"] == "downloaded")].sort_values("row_id")
    assert outcome[["row_id", "kind", "reason"]].values.tolist() == [
        [0, "info", "downloaded"], [1, "drop", "http_404"], [2, "drop", "url_duplicate"], [3, "drop", "url_private"],
        [4, "drop", "list_row_malformed"]]  # fmt: skip
    error = json.loads(outcome.iloc[4]["detail"])["error"]
    if fmt == "csv":
        assert error == f"expected 2 fields, got 1: {cut_url}"
    else:
        assert error == f'not valid JSON (Unterminated string starting at): {{"url": "{cut_url}'
    dropped = {"http_404": 1, "list_row_malformed": 1, "url_duplicate": 1, "url_private": 1}
    assert result.counts == {"rows": 5, "downloaded": 1, "kept": 1, "dropped": dropped}


def test_truncated_parquet_list_stops_before_any_download(tmp_path, loopback_only):
    pd.DataFrame({"url": [f"http://127.0.0.1:1/img/{i}.png" for i in range(50)]}).to_parquet(tmp_path / "u.parquet")
    data = (tmp_path / "u.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    stage = tmp_path / "run" / "stages" / "ingest"
    cfg = IngestConfig(**CFG)
    with pytest.raises(UrlListError) as err:
        ingest(DataConfig(url_list=tmp_path / "cut.parquet"), stage, cfg, ShardTracker("ingest", stage))
    message = str(err.value)
    path = tmp_path / "cut.parquet"
    assert message.startswith(f"cannot read URL list {path} (parquet; truncated or corrupt? re-copy it)")
    assert "stopped before any download. Copy the file again from its source" in message
    assert loopback_only == [] and not (stage / "shards").exists() and not (stage / "ledger").exists()


def test_take_over_moves_the_unchanged_leading_shards_and_resumes(tmp_path):
    """A stale attempt's completed shards are taken up to the first shard whose planned rows changed, except one
    that retry-failed downloaded again in part; an attempt interrupted after taking some takes the rest when
    resumed."""
    from curation.ingest import PLAN, take_over
    from infra.storage import Markers

    old, new = tmp_path / "previous", tmp_path / "ingest"
    names = ["00000", "00001", "00002", "00003", "00004"]
    for d in (old, new):
        (d / PLAN / "inputs").mkdir(parents=True)
        for i, n in enumerate(names):
            pd.DataFrame({"row_id": [i], "url": [f"http://h/{i}"]}).to_parquet(d / PLAN / "inputs" / f"{n}.parquet")
    pd.DataFrame({"row_id": [3], "url": ["http://h/edited"]}).to_parquet(new / PLAN / "inputs" / "00003.parquet")
    pd.DataFrame({"row_id": [1], "url": ["http://h/1"]}).to_parquet(old / PLAN / "inputs" / "r1-00001.parquet")
    for n in [*names, "r1-00001"]:
        for rel in (f"shards/{n}.tar", f"shards/{n}.parquet", f"ledger/{n}.parquet"):
            (old / rel).parent.mkdir(parents=True, exist_ok=True)
            (old / rel).write_text(n)
        Markers(old).mark(n, {"rows": 1})
    # an attempt interrupted after it took shard 0 (its marker moved last)
    for rel in ("shards/00000.tar", "shards/00000.parquet", "ledger/00000.parquet", "_done/00000.json"):
        (new / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).replace(new / rel)
    assert take_over(old, new, names) == ["00002"]  # 1 was retried: downloaded anew; 3 is edited: nothing after it
    assert Markers(new).done() == ["00000", "00002"]
    assert (new / "shards" / "00002.tar").read_text() == "00002" and not (old / "shards" / "00002.tar").exists()
    assert not (new / "shards" / "00004.tar").exists() and not (new / "shards" / "r1-00001.tar").exists()
