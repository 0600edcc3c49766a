"""What a URL list says about each image reaches the corpus: the caption, and the further columns a user names
(`data.extra_cols`, img2dataset's save_additional_columns: LAION's LICENSE, similarity, ...), through ingest, the
faces stage's sanitized pool and the corpus, and into each row's lineage."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curation.corpus import MANIFEST_TABLE, build_corpus
from curation.faces import blur_faces
from curation.ingest import excluded, ingest
from infra.config.curation import CorpusConfig
from infra.config.data import DataConfig
from infra.config.ingest import FacesConfig, IngestConfig
from infra.demo.server import DemoServer, free_port
from infra.lineage import Ledger
from infra.shards import list_shards
from infra.stage import ShardTracker
from tests.curation.conftest import png


def test_captions_and_extra_columns_reach_the_corpus_and_the_lineage(tmp_path, loopback_only):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # three different images (no hash or perceptual duplicates)
        (tmp_path / "images" / f"g{i}.png").write_bytes(png(Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8))))
    port = free_port()
    listed = pd.DataFrame({
        "URL": [f"http://127.0.0.1:{port}/img/g{i}.png" for i in range(3)],
        "TEXT": ["a dark square", None, "a light square"],
        "LICENSE": ["cc-by", "?", None],
        "similarity": [0.31, 0.25, np.nan],
        "tags": [["a", "b"], [], ["c"]],
        "source": ["crawl-a", None, "crawl-b"],
    })  # fmt: skip
    listed.to_parquet(tmp_path / "laion.parquet")
    data = DataConfig(url_list=tmp_path / "laion.parquet", url_col="URL", caption_col="TEXT",
                      extra_cols=["LICENSE", "similarity", "tags"])  # fmt: skip
    run = tmp_path / "run" / "stages"
    with DemoServer(tmp_path / "images", port):
        ingest(data, run / "ingest", IngestConfig(shard_size=2, threads=2, timeout=2, allow_hosts=["127.0.0.1"]),
               ShardTracker("ingest", run / "ingest"))  # fmt: skip
    extra = [{"LICENSE": "cc-by", "similarity": 0.31, "tags": ["a", "b"]},
             {"LICENSE": "?", "similarity": 0.25, "tags": []}, {"LICENSE": None, "similarity": None, "tags": ["c"]}]  # fmt: skip
    ev = Ledger(tmp_path / "run").events()
    inputs = ev[ev["reason"] == "input"].sort_values("row_id")
    assert [json.loads(d) for d in inputs["detail"]] == [
        {"source": s, "caption": c, "extra": e} for s, c, e in zip(listed["source"], listed["TEXT"], extra, strict=True)]
    shards = list_shards(run / "ingest" / "shards")
    table = pd.concat([s.read_table(["row_id", "caption", "extra"]) for s in shards]).sort_values("row_id")
    assert table["caption"].tolist() == ["a dark square", None, "a light square"]
    assert [json.loads(x) for x in table["extra"]] == extra
    # the faces stage writes the sanitized pool without them; the corpus joins them back from ingest's tables
    blur_faces(shards, excluded(run / "ingest"), run / "faces", FacesConfig(enabled=False), ShardTracker("faces", run / "faces"))
    pool = pd.concat([s.read_table(["image_id", "row_id"]).assign(shard=s.name)
                      for s in list_shards(run / "faces" / "shards")])  # fmt: skip
    selected = pool.assign(seed_set="none", method="sample")
    build_corpus(selected, run / "faces" / "shards", [], pd.DataFrame(columns=["seed_set"]), run / "corpus",
                 CorpusConfig(shard_size=8), ingest_shard_dir=run / "ingest" / "shards")  # fmt: skip
    corpus = pd.read_parquet(run / "corpus" / MANIFEST_TABLE).sort_values("row_id")
    assert corpus["caption"].tolist() == ["a dark square", None, "a light square"]
    assert corpus["source"].tolist() == ["pool"] * 3 and corpus["list_source"].tolist() == ["crawl-a", None, "crawl-b"]
    assert corpus["LICENSE"].tolist() == ["cc-by", "?", None]
    assert corpus["similarity"].tolist() == pytest.approx([0.31, 0.25, np.nan], nan_ok=True)
    assert [list(t) for t in corpus["tags"]] == [["a", "b"], [], ["c"]]
    with tarfile.open(next((run / "corpus" / "shards").glob("*.tar"))) as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    first = next(m for m in metas if m["row_id"] == 0)
    assert {k: first[k] for k in ("caption", "LICENSE", "similarity", "tags", "list_source")} == {
        "caption": "a dark square", "LICENSE": "cc-by", "similarity": 0.31, "tags": ["a", "b"],
        "list_source": "crawl-a"}  # as img2dataset's .json, and the list's source


def test_extra_columns_may_not_overwrite_the_pipelines_own():
    with pytest.raises(ValueError, match=r"extra_cols: \['url', 'width'\] would overwrite"):
        DataConfig(extra_cols=["width", "url", "LICENSE"])
    with pytest.raises(ValueError, match=r"extra_cols: \['TEXT'\] would overwrite"):
        DataConfig(caption_col="TEXT", extra_cols=["TEXT"])


def test_a_named_extra_column_missing_from_a_list_is_refused_at_start_up(tmp_path):
    from curation.urls import url_list_problems

    pd.DataFrame({"URL": ["http://h/1"], "LICENSE": ["cc0"]}).to_parquet(tmp_path / "part-0.parquet")
    data = DataConfig(url_list=tmp_path / "part-0.parquet", url_col="URL", extra_cols=["LICENSE", "similarity"])
    assert url_list_problems(data) == [
        f"data.extra_cols: ['similarity'] not in {tmp_path}/part-0.parquet (columns: ['URL', 'LICENSE'])"]
    (tmp_path / "rows.jsonl").write_text('{"url": "http://h/1"}\n')  # a JSON row may lack a key: null in its extra
    assert url_list_problems(DataConfig(url_list=tmp_path / "rows.jsonl", extra_cols=["LICENSE"])) == []
