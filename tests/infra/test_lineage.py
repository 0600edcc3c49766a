import json

from infra.lineage import Ledger, LedgerWriter, check_terminal_outcomes


def _ledger(run_dir):
    ing = LedgerWriter("ingest")
    for row, url in enumerate(["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg", "http://a/1.jpg"]):
        ing.info("input", row_id=row, url=url)
    ing.drop("http_404", row_id=1, detail={"error": "HTTP Error 404"})
    ing.drop("url_duplicate", row_id=3, detail={"duplicate_of_row": 0})
    ing.info("downloaded", row_id=0, image_id="i0")
    ing.info("downloaded", row_id=2, image_id="i2")
    ing.write(run_dir / "stages" / "ingest" / "ledger" / "00000.parquet")
    dd = LedgerWriter("dedup")
    dd.info("dup_component", row_id=2, image_id="i2", detail={"representative": "i0"})
    dd.drop("near_duplicate", row_id=2, image_id="i2", detail={"representative": "i0"})
    dd.write(run_dir / "stages" / "dedup" / "ledger" / "dedup.parquet")
    co = LedgerWriter("corpus")
    co.keep("in_corpus", row_id=0, image_id="i0")
    co.keep("in_corpus", image_id="s1", source="seeds")
    co.write(run_dir / "stages" / "corpus" / "ledger" / "corpus.parquet")


def test_chain_of_a_url_and_of_an_image(tmp_path):
    _ledger(tmp_path)
    ledger = Ledger(tmp_path)
    chain = ledger.chain(url="http://a/1.jpg")
    assert chain[["stage", "kind", "reason", "row_id"]].values.tolist() == [
        ["ingest", "info", "input", 0],
        ["ingest", "info", "input", 3],
        ["ingest", "info", "downloaded", 0],
        ["ingest", "drop", "url_duplicate", 3],
        ["corpus", "keep", "in_corpus", 0],
    ]
    chain = ledger.chain(image_id="i2")
    assert chain[["stage", "kind", "reason"]].values.tolist() == [
        ["ingest", "info", "input"],
        ["ingest", "info", "downloaded"],
        ["dedup", "info", "dup_component"],
        ["dedup", "drop", "near_duplicate"],
    ]
    assert json.loads(chain.iloc[3]["detail"]) == {"representative": "i0"}


def test_terminal_outcome_invariant(tmp_path):
    _ledger(tmp_path)
    check = check_terminal_outcomes(Ledger(tmp_path))
    assert check.ok
    assert (check.n_rows, check.n_kept) == (4, 1)
    assert check.dropped == {"dedup:near_duplicate": 1, "ingest:http_404": 1, "ingest:url_duplicate": 1}


def test_invariant_names_missing_and_double_outcomes(tmp_path):
    _ledger(tmp_path)
    extra = LedgerWriter("retrieve")
    extra.drop("not_retrieved", row_id=0, image_id="i0")
    extra.info("input", row_id=9, url="http://a/9.jpg")
    extra.write(tmp_path / "stages" / "retrieve" / "ledger" / "x.parquet")
    ing = LedgerWriter("ingest")
    ing.info("input", row_id=9, url="http://a/9.jpg")
    ing.write(tmp_path / "stages" / "ingest" / "ledger" / "00001.parquet")
    check = check_terminal_outcomes(Ledger(tmp_path))
    assert not check.ok
    assert (check.missing, check.multiple) == ([9], [0])


def test_a_ledger_in_parts_holds_one_part_and_replaces_an_earlier_attempt(tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    import pytest

    from infra import lineage
    from infra.lineage import LedgerParts

    folder = tmp_path / "stages" / "dedup" / "ledger"
    old = LedgerWriter("dedup")  # what an earlier version (one file) and an earlier attempt (more parts) left
    old.info("dup_component", row_id=99, image_id="old")
    for name in ("dedup.parquet", "dedup-00000.parquet", "dedup-00007.parquet", "dedupe.parquet"):
        old.write(folder / name)
    monkeypatch.setattr(lineage, "PART_EVENTS", 5)
    w = LedgerParts("dedup", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["dedupe.parquet"]  # another ledger's file stays
    for r in range(7):
        w.info("dup_component", row_id=r, image_id=f"i{r}")
        assert len(w.rows) < 5  # a full part is written when it fills
    w.extend(pq.read_table(folder / "dedupe.parquet"))  # events as a table (the bench's scaler)
    for r in range(3):
        w.drop("near_duplicate", row_id=r, image_id=f"i{r}")
    with pytest.raises(TypeError):
        w.write(folder / "dedup.parquet")
    parts = w.close()
    assert [p.name for p in parts] == ["dedup-00000.parquet", "dedup-00001.parquet", "dedup-00002.parquet"]
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [5, 5, 1]
    assert pq.read_table(parts).column("row_id").to_pylist() == [0, 1, 2, 3, 4, 5, 6, 99, 0, 1, 2]
    assert w.counts() == {"drop": {"near_duplicate": 3}, "keep": {}, "info": {"dup_component": 8}}
    assert Ledger(tmp_path).chain(row_id=1)["reason"].tolist() == ["dup_component", "near_duplicate"]
    empty = LedgerParts("dedup", folder, part_events=3).close()  # a stage without events: one empty part
    assert [p.name for p in empty] == ["dedup-00000.parquet"] and pq.read_table(empty[0]).num_rows == 0
    assert sorted(p.name for p in folder.iterdir()) == ["dedup-00000.parquet", "dedupe.parquet"]
