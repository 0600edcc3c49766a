"""The lineage index against the full scan it replaces: the same chains for every row, URL and image of a small run;
a missing, behind or stale index found and rebuilt; look-ups that read only the ledger files the index names."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from infra import lineage_index, lineage_lookup
from infra.lineage import Ledger, LedgerWriter, ledger_files, url_key
from infra.lineage_index import INDEX_NAME, connect, index_stage, sync
from infra.lineage_lookup import AmbiguousId, IndexedLedger, find_chain, parse_key
from tests.infra import lineage_runs
from tests.infra.lineage_runs import IDS, N_ROWS, SEEDS, WHITESPACE_URL


@pytest.fixture
def run(tmp_path, monkeypatch) -> Path:
    return lineage_runs.build(tmp_path / "run", monkeypatch)


def _same(indexed: pd.DataFrame, scanned: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(indexed, scanned)


def test_every_row_url_and_image_has_the_chain_of_the_full_scan(run):
    scan, index = Ledger(run), IndexedLedger(run)
    assert sum(pq.ParquetFile(f).num_row_groups > 1 for f in ledger_files(run)) >= 5  # locations inside files matter
    for r in range(N_ROWS + 1):  # + a row that does not exist
        _same(index.chain(row_id=r), scan.chain(row_id=r))
    inputs = scan.query(columns=["reason", "url"])
    for url in [*sorted(set(inputs.loc[inputs["reason"] == "input", "url"])), "http://nowhere.example/x.png"]:
        _same(index.chain(url=url), scan.chain(url=url))
    recorded = set(scan.query(columns=["image_id"])["image_id"].dropna())
    assert recorded <= set(IDS.values()) | set(SEEDS) and len(recorded) == 27  # 25 downloaded, 2 seeds
    for image in sorted(set(IDS.values()) | set(SEEDS)):  # + those of rows dropped before any download
        _same(index.chain(image_id=image), scan.chain(image_id=image))
        if image in recorded and not image.startswith("abcdef"):
            assert index.resolve_image(image[:8]) == image
    # the fixture's cases, in numbers: row 5's two attempts, rows 9 and 10 for one image, row 20's cross-shard drop
    assert index.chain(row_id=5)[["stage", "reason", "attempt"]].values.tolist() == [
        ["ingest", "input", 0], ["ingest", "http_500", 0], ["ingest", "retry", 1], ["ingest", "downloaded", 1],
        ["nsfw", "nsfw_score", 0], ["faces", "faces", 0], ["dedup", "dup_component", 0], ["retrieve", "retrieved", 0],
        ["corpus", "in_corpus", 0]]
    assert sorted(set(index.chain(image_id=IDS[9])["row_id"])) == [9, 10]
    assert index.chain(row_id=20)[["stage", "reason"]].values.tolist()[-1] == ["ingest", "phash_duplicate"]


def test_a_url_is_found_as_stored_and_as_typed(run):
    index = IndexedLedger(run)
    for typed in (WHITESPACE_URL, WHITESPACE_URL.strip(), f"\t{WHITESPACE_URL.strip()}  "):
        chain = index.chain(url=typed)
        assert sorted(set(chain["row_id"])) == [7, 8]  # row 8 listed the same URL without the spaces
        _same(chain, Ledger(run).chain(url=typed))
    assert url_key(WHITESPACE_URL) == WHITESPACE_URL.strip()


def test_an_image_id_prefix_resolves_or_names_the_candidates(run):
    index = IndexedLedger(run)
    assert index.resolve_image("abcdef0") == IDS[11]
    with pytest.raises(AmbiguousId) as err:
        index.resolve_image("abcdef")
    assert err.value.candidates == [IDS[11], IDS[12]] and not err.value.more
    assert index.resolve_image("0000000000") is None
    assert parse_key(IDS[4][:12] + "…") == ("image", IDS[4][:12])  # as lineage prints it
    assert parse_key(IDS[4][:12].upper() + "...") == ("image", IDS[4][:12])
    assert parse_key("row:17") == ("row", 17)
    assert parse_key("abc") == ("url", "abc")  # under 4 digits: not taken for a prefix
    chain, key = find_chain(run, IDS[4][:10])
    assert key == IDS[4] and chain == IndexedLedger(run).events(image_id=IDS[4]) and len(chain) == 7


def test_lookups_read_only_the_ledger_files_the_index_names(run, monkeypatch):
    index_all(run)
    parts = {s: [f for f in ledger_files(run) if f.parent.parent.name == s] for s in ("dedup", "corpus")}
    assert [len(p) for p in parts.values()] == [4, 4]  # 24 events each, in parts of 6
    opened = []  # every parquet file the look-ups open (its footer read), counted where they open it
    real = lineage_lookup.pq.ParquetFile
    monkeypatch.setattr(lineage_lookup.pq, "ParquetFile", lambda path, *a, **kw: opened.append(Path(path))
                        or real(path, *a, **kw))  # fmt: skip
    expected = {}
    for key in (f"row:{4}", IDS[9][:12], lineage_runs.url(13), "row:27"):
        chain, _ = find_chain(run, key)
        expected[key] = chain
        holding = {f for f in ledger_files(run) if _holds(f, chain)}
        opened.clear()
        ledger = IndexedLedger(run)
        kind, value = parse_key(key)
        if kind == "image":
            value = ledger.resolve_image(value)
        ledger.chain(**{{"row": "row_id", "image": "image_id", "url": "url"}[kind]: value})
        assert ledger.files_read == holding == set(opened), key
        if kind != "url":  # a row's or an image's events: one part of each whole-pool ledger it reached
            assert [len(holding & set(p)) for p in parts.values()] == [1, 1], key
    # Every other ledger file emptied in place (the folder's mtime does not change): the look-ups still succeed.
    read = set().union(*({f for f in ledger_files(run) if _holds(f, c)} for c in expected.values()))
    for f in set(ledger_files(run)) - read:
        with open(f, "r+b") as handle:
            handle.truncate(0)
    for key, chain in expected.items():
        assert find_chain(run, key)[0] == chain


def _holds(path: Path, chain: list[dict]) -> bool:
    events = pq.read_table(path).to_pandas()
    rows = {e["row_id"] for e in chain if e["row_id"] is not None}
    images = {e["image_id"] for e in chain if e["image_id"] is not None}
    return bool((events["row_id"].isin(rows) | events["image_id"].isin(images)).any())


def index_all(run: Path) -> dict[str, int]:
    return {d.name: index_stage(d) for d in sorted((run / "stages").iterdir())}


def _file_ids(stage_dir: Path) -> dict[str, int]:
    conn = sqlite3.connect(stage_dir / INDEX_NAME)
    try:
        return dict(conn.execute("SELECT name, id FROM files"))
    finally:
        conn.close()


def test_a_missing_index_is_built_and_new_files_are_added_without_rebuilding(run):
    assert not list(run.glob(f"stages/*/{INDEX_NAME}"))
    reference = Ledger(run).chain(row_id=6)
    _same(IndexedLedger(run).chain(row_id=6), reference)  # built by the look-up
    assert set(index_all(run).values()) == {0}  # current: nothing read again
    ingest = run / "stages" / "ingest"
    before = _file_ids(ingest)
    retry = LedgerWriter("ingest", attempt=2)  # a later retry adds a file: only it is indexed
    retry.info("retry", row_id=6, url=lineage_runs.url(6))
    retry.drop("timeout", row_id=6)
    retry.write(ingest / "ledger" / "r2-00000.parquet")
    assert index_stage(ingest) == 1
    assert {k: v for k, v in _file_ids(ingest).items() if k in before} == before
    chain = IndexedLedger(run).chain(row_id=6)
    _same(chain, Ledger(run).chain(row_id=6))
    assert chain.loc[chain["attempt"] == 2, "reason"].tolist() == ["retry", "timeout"]


def test_a_file_changed_after_indexing_is_caught_when_read_and_the_stage_rebuilt(run):
    index_all(run)
    dedup = [p for p in ledger_files(run) if p.parent.parent.name == "dedup"]
    path = next(p for p in dedup if 4 in pq.read_table(p)["row_id"].to_pylist())  # the part holding row 4
    table = pq.read_table(path)
    mtime = os.stat(path.parent).st_mtime_ns
    w = LedgerWriter("dedup")  # rewritten in place: the folder's mtime stays, the file's size and mtime change
    w.rows = table.to_pylist()
    w.info("dup_component", row_id=4, image_id=IDS[4], detail={"note": "added"})
    pq.write_table(pq.read_table(w.write(run / "moved.parquet")), path, row_group_size=4)
    os.utime(path.parent, ns=(mtime, mtime))
    chain = IndexedLedger(run).chain(row_id=4)
    _same(chain, Ledger(run).chain(row_id=4))
    assert chain.loc[chain["stage"] == "dedup", "detail"].tolist() == [f'{{"representative": "{IDS[4]}"}}',
                                                                       '{"note": "added"}']


def test_an_index_of_another_url_normalisation_is_rebuilt(run, monkeypatch):
    index_all(run)
    monkeypatch.setattr(lineage_index, "url_key", lambda text: text.strip().lower())
    conn = connect(run / "stages" / "ingest")
    try:
        assert sync(conn, run / "stages" / "ingest") == 4  # every file again
    finally:
        conn.close()


def test_stage_completion_writes_the_index(tmp_path):
    from infra.config import load_config
    from infra.run import RunDir
    from infra.stage import StageResult, StageSpec, run_stage

    def fn(ctx):
        tracker = ctx.tracker()
        for shard in ("00000", "00001"):
            w = tracker.ledger()
            w.info("input", row_id=int(shard), url=f"http://a.example/{shard}")
            w.write(tracker.ledger_path(shard))
        return StageResult(counts={"kept": 2})

    run = RunDir(tmp_path, "r")
    run_stage(StageSpec("ingest", ("ingest",), (), fn), run, load_config(None))
    conn = connect(run.stage_dir("ingest"))
    try:
        assert (run.stage_dir("ingest") / INDEX_NAME).is_file()
        assert sync(conn, run.stage_dir("ingest")) == 0  # written by the hook, current
        assert conn.execute("SELECT count(*) FROM files").fetchone()[0] == 2
    finally:
        conn.close()
    assert IndexedLedger(run.path).chain(url="http://a.example/00001")["row_id"].tolist() == [1]


def test_lineage_cli_takes_prefixes_rows_and_urls_and_refuses_an_ambiguous_prefix(run, capsys):
    from flows.cli import main

    args = ["--root", str(run.parent)]
    assert main(["lineage", run.name, IDS[14][:12] + "…", *args]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"lineage of {IDS[14]}" and "outcome: kept in the corpus" in out
    assert main(["lineage", run.name, "abcdef", *args]) == 2
    err = capsys.readouterr().err
    assert "image id prefix 'abcdef' is ambiguous: 2 images start with it" in err
    assert f"  {IDS[11]}\n  {IDS[12]}\n" in err
    assert main(["lineage", run.name, "row:8", *args]) == 0
    assert "outcome: dropped at stage ingest: url_duplicate" in capsys.readouterr().out
    assert main(["lineage", run.name, WHITESPACE_URL.strip(), *args, "--json"]) == 0
    assert {e["row_id"] for e in json.loads(capsys.readouterr().out)} == {7, 8}
    assert main(["lineage", run.name, "row:99", *args]) == 1
    assert capsys.readouterr().err == f"no lineage for 'row:99' in run {run.name}\n"
