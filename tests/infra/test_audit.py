"""`lvd audit`, streamed: a clean run passes, each kind of discrepancy is named, a run stopped by `run.stop_after`
is audited for what ran, and the lineage index is checked against the ledger and rebuilt where it disagrees."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from infra.audit import KEPT_PER_CHECK, audit_run
from infra.config import load_config
from infra.lineage import Ledger, LedgerWriter, check_terminal_outcomes
from infra.lineage_index import INDEX_NAME
from infra.lineage_lookup import IndexedLedger
from infra.manifest import StageManifest, write_manifest
from infra.run import RunDir
from tests.infra import lineage_runs
from tests.infra.lineage_runs import IDS

# What each stage of lineage_runs kept and dropped (the manifests a run writes).
COUNTS = {"ingest": {"kept": 24, "dropped": {"http_404": 2, "url_malformed": 1, "url_duplicate": 1,
                                             "exact_duplicate": 1, "phash_duplicate": 1}, "rows": 30},
          "nsfw": {"kept": 23, "dropped": {"nsfw": 1}}, "faces": {"kept": 23, "dropped": {}},
          "dedup": {"kept": 22, "dropped": {"near_duplicate": 1}}, "embed": {"kept": 22},
          "retrieve": {"kept": 22, "dropped": {}}, "rebalance": {"kept": 22}, "corpus": {"kept": 24}}  # fmt: skip


def _run(tmp_path: Path, mp: pytest.MonkeyPatch, stages=tuple(COUNTS), **cfg) -> RunDir:
    lineage_runs.build(tmp_path / "run", mp)
    run = RunDir(tmp_path, "run")
    for stage in stages:
        write_manifest(run.stage_dir(stage), StageManifest(
            stage=stage, run_id="run", config_hash="c", code_version="v", inputs_digest="d", started_at="t",
            finished_at="t", counts=COUNTS[stage]))  # fmt: skip
    overrides = ["train.enabled=false", *(f"{k.replace('__', '.')}={v}" for k, v in cfg.items())]
    run.save_config(load_config(None, overrides))
    return run


def _without(path: Path, rows: list[int], reason: str | None = None) -> pa.ChunkedArray:
    """The events of a ledger file to keep: all but those of ``rows`` (with ``reason``, if given)."""
    t = pq.read_table(path)
    drop = pc.fill_null(pc.is_in(t["row_id"], pa.array(rows, pa.int64())), False)
    if reason is not None:
        drop = pc.and_(drop, pc.equal(t["reason"], reason))
    return pc.invert(drop)


def _part(run: RunDir, stage: str, row: int) -> Path:
    """The part of a whole-pool stage's ledger that holds a row's events."""
    return next(p for p in sorted((run.stage_dir(stage) / "ledger").iterdir())
                if row in pq.read_table(p)["row_id"].to_pylist())  # fmt: skip


def _rewrite(path: Path, keep: pa.ChunkedArray | None = None, add: LedgerWriter | None = None) -> None:
    table = pq.read_table(path)
    table = table.filter(keep) if keep is not None else table
    if add is not None:
        table = pa.concat_tables([table, pa.Table.from_pylist(add.rows, schema=table.schema)])
    pq.write_table(table, path, row_group_size=4)


def test_a_clean_run_passes(tmp_path, monkeypatch):
    run = _run(tmp_path, monkeypatch)
    report = audit_run(run)
    assert report.ok, report.format()
    assert report.checked == {"output files": 0, "ledger files": 17, "corpus images": 24, "input rows": 30,
                              "chains": 22, "stage manifests": 6}  # fmt: skip  (embed, rebalance: no ledger here)
    assert report.notes == [f"lineage index of stage {s}: {n} ledger files indexed (it was missing or behind its "
                            "ledger)" for s, n in (("corpus", 4), ("dedup", 4), ("faces", 2), ("ingest", 4),
                                                   ("nsfw", 2), ("retrieve", 1))]  # fmt: skip
    assert audit_run(run).notes == []  # the index is now current
    assert check_terminal_outcomes(Ledger(run.path)).ok  # the in-memory check agrees


def test_each_discrepancy_is_named(tmp_path, monkeypatch):
    run = _run(tmp_path, monkeypatch)
    corpus = _part(run, "corpus", 4)
    again = LedgerWriter("corpus")  # a second keep for row 4's image, with another sha256
    again.keep("in_corpus", row_id=4, image_id=IDS[4], detail={"sha256": "0" * 64})
    _rewrite(corpus, add=again)
    corpus = _part(run, "corpus", 17)
    _rewrite(corpus, keep=_without(corpus, [17]))  # row 17's image stays in the shard without its keep
    ingest = run.stage_dir("ingest") / "ledger" / "00001.parquet"
    extra = LedgerWriter("ingest")  # row 18 gets a second outcome
    extra.drop("timeout", row_id=18)
    _rewrite(ingest, add=extra)
    dedup = _part(run, "dedup", 19)
    _rewrite(dedup, keep=_without(dedup, [19]))  # row 19 kept without a dedup event
    report = audit_run(run)
    stored = lineage_runs.sha256_bytes(lineage_runs.stored(IDS[4]))
    assert report.problems == [
        ("corpus", f"image {IDS[4]}: 2 keep events"),
        ("corpus", f"image {IDS[4]} in shard 00000: bytes hash to {stored[:12]}, the ledger recorded {'0' * 12}"),
        ("corpus", f"image {IDS[17]} in shard 00000: no keep event in the ledger"),
        ("outcomes", "input row 17: no terminal outcome"),
        ("outcomes", "input row 4: more than one terminal outcome"),
        ("outcomes", "input row 18: more than one terminal outcome"),
        ("chains", f"image {IDS[19]} (row 19): no event at stage(s) dedup"),
        ("counts", "stage ingest: drops per reason differ (manifest, ledger): {'timeout': (0, 1)}"),
    ]  # row 5's http_500, superseded by its retry's download, is not a second outcome
    assert report.n_problems == 8 and report.format().endswith("audit: 8 discrepancies")


def test_problems_beyond_a_hundred_per_check_are_counted_not_kept(tmp_path, monkeypatch):
    run = _run(tmp_path, monkeypatch)
    extra = LedgerWriter("ingest")
    for r in range(1000, 1250):  # 250 rows listed and never decided
        extra.info("input", row_id=r, url=f"http://late.example/{r}")
    extra.write(run.stage_dir("ingest") / "ledger" / "00002.parquet")
    report = audit_run(run)
    assert len([p for p in report.problems if p[0] == "outcomes"]) == KEPT_PER_CHECK
    assert report.counts["outcomes"] == 250 and report.checked["input rows"] == 280
    assert report.format(limit=3).splitlines()[-2:] == ["... and 247 more", "audit: 250 discrepancies"]


def test_a_run_stopped_by_stop_after_is_audited_for_what_ran(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    run = _run(tmp_path, monkeypatch, stages=("ingest", "nsfw", "faces", "dedup"), run__stop_after="dedup")
    for stage in ("retrieve", "corpus"):  # what a run stopped after dedup has not written
        shutil.rmtree(run.stage_dir(stage))
    assert main(["audit", "run", "--root", str(tmp_path)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("checked: output files 0, ledger files 12, corpus images 0, rows still in the pipeline 22, "
                      "input rows 30, chains 0, stage manifests 4")  # fmt: skip
    assert out[1] == "note: the run stops after stage dedup (run.stop_after); not run: embed, retrieve, rebalance, corpus"
    assert out[-1] == "audit: OK"
    nsfw = run.stage_dir("nsfw") / "ledger" / "00001.parquet"
    _rewrite(nsfw, keep=_without(nsfw, [21]))  # a row lost at a stage that ran: no event, no outcome
    assert main(["audit", "run", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL [outcomes] input row 21: no terminal outcome, and missing at a stage that ran (ingest, nsfw, faces, " \
           "dedup)" in out
    assert out.rstrip().endswith("audit: 1 discrepancies")


def test_the_lineage_index_is_checked_against_the_ledger_and_rebuilt(tmp_path, monkeypatch):
    run = _run(tmp_path, monkeypatch)
    assert audit_run(run).ok
    conn = sqlite3.connect(run.stage_dir("dedup") / INDEX_NAME)  # the index loses an entry; the ledger is intact
    conn.execute("DELETE FROM by_row WHERE row_id = 14")
    conn.commit()
    conn.close()
    assert IndexedLedger(run.path).chain(row_id=14)["stage"].tolist().count("dedup") == 1  # 2 in the ledger
    report = audit_run(run)
    assert report.ok and report.notes == ["lineage index of stage dedup: disagreed with its ledger (a file changed "
                                          "after it was indexed); rebuilt"]  # fmt: skip
    assert IndexedLedger(run.path).chain(row_id=14).equals(Ledger(run.path).chain(row_id=14))
    assert audit_run(run).notes == []
