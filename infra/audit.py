"""`lvd audit RUN_ID`: check a finished (or partial) run against its own records, naming every discrepancy.

Checks, each independent of the others so that one corruption does not hide another:

- ``outputs``: every output file a stage manifest lists exists with the recorded size and sha256;
- ``corpus``: every corpus image re-hashed against the sha256 its ledger ``keep`` event recorded; every keep has
  its image in the corpus shards and every image in the shards has exactly one keep;
- ``outcomes``: every input URL row has exactly one terminal outcome (drop or keep); in a run that has not run its
  corpus stage (``run.stop_after``, or not finished), a row may have none yet, if it has an event at every
  completed stage that records each image it passes (it is still in the pipeline);
- ``chains``: every kept pool image has a complete chain back to its URL (an ingest ``input`` event with the URL,
  and an event at every curation stage it passed);
- ``counts``: each manifest's drop counts per reason equal its ledger's, and kept + dropped add up to the
  stage's input;
- the lineage index (derived data) is compared with the ledger, and rebuilt where it disagrees (a note, not a
  discrepancy: the record is the ledger).

Streamed (:mod:`infra.audit_ledger`): memory stays flat whatever the run's size. The audit never writes the run's
record; it may bring the lineage index up to date.
"""

from __future__ import annotations

import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from infra import plan
from infra.audit_ledger import LedgerScan, scratch
from infra.config import PipelineConfig
from infra.lineage import POOL
from infra.manifest import read_manifest
from infra.run import RunDir
from infra.run_lock import UNKNOWN, holder
from infra.shards import iter_tar, list_shards
from infra.storage import sha256_bytes, sha256_file

# Stages every kept pool image passes through and that record at least one event about it.
CHAIN_STAGES = ("ingest", "nsfw", "faces", "dedup", "retrieve")
# Stages that record an event for every image they pass on: a row still in the pipeline has one at each that ran.
EVERY_IMAGE_STAGES = (*CHAIN_STAGES, "rebalance")
KEPT_PER_CHECK = 100  # problems kept per check (and counted beyond): memory stays flat however broken a run is


@dataclass
class AuditReport:
    checked: dict[str, int] = field(default_factory=dict)  # what was checked, per check
    problems: list[tuple[str, str]] = field(default_factory=list)  # (check, message), up to KEPT_PER_CHECK each
    counts: dict[str, int] = field(default_factory=dict)  # problems per check, all of them
    notes: list[str] = field(default_factory=list)  # what was not checked and why, the index's upkeep

    @property
    def ok(self) -> bool:
        return self.n_problems == 0

    @property
    def n_problems(self) -> int:
        return sum(self.counts.values())

    def add(self, check: str, message: str, n: int = 1) -> None:
        """Record ``n`` problems of ``check``; the message is kept while the check has fewer than KEPT_PER_CHECK."""
        if self.counts.get(check, 0) < KEPT_PER_CHECK:
            self.problems.append((check, message))
        self.more(check, n)

    def more(self, check: str, n: int) -> None:
        """Count ``n`` problems of ``check`` without a message (beyond those listed)."""
        self.counts[check] = self.counts.get(check, 0) + n

    def format(self, limit: int = 50) -> str:
        lines = [f"checked: {', '.join(f'{k} {v}' for k, v in self.checked.items())}"]
        lines += [f"note: {n}" for n in self.notes]
        for check, msg in self.problems[:limit]:
            lines.append(f"FAIL [{check}] {msg}")
        if self.n_problems > min(limit, len(self.problems)):
            lines.append(f"... and {self.n_problems - min(limit, len(self.problems))} more")
        lines.append("audit: OK" if self.ok else f"audit: {self.n_problems} discrepancies")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "notes": self.notes, "counts": self.counts,
                "problems": [{"check": c, "message": m} for c, m in self.problems]}  # fmt: skip


def audit_run(run: RunDir, cfg: PipelineConfig | None = None, work: Path | None = None) -> AuditReport:
    """``cfg``: the run's configuration (read from the run when None). ``work``: where the scratch database goes
    (a temporary folder by default)."""
    cfg = cfg if cfg is not None else run.load_config()
    report = AuditReport()
    corpus_ran = "corpus" not in _not_run(run, cfg, report)
    _check_outputs(run, report)
    with tempfile.TemporaryDirectory(prefix="lvd-audit-", dir=work) as tmp:
        db = scratch(Path(tmp) / "audit.sqlite")
        try:
            scan = LedgerScan(run.path, db, Path(tmp))
            scan.run()
            report.notes += scan.notes
            report.checked["ledger files"] = scan.files
            _store_corpus(run, db)
            _check_corpus(db, report)
            completed = {d.name for d in _stage_dirs(run) if read_manifest(d) is not None}
            _check_outcomes(db, report, corpus_ran, stages=_attached(db) & completed)
            _check_chains(db, report, _attached(db))
            _check_counts(run, db, report)
        finally:
            db.close()
    return report


def _not_run(run: RunDir, cfg: PipelineConfig, report: AuditReport) -> list[str]:
    """The stages of the configuration without a manifest (what the audit cannot check), those after
    `run.stop_after` and those not finished yet said in notes (`lvd status` says why the others do not run)."""
    skipped = plan.not_run(cfg)
    stop = cfg.run.stop_after
    after = [s for s, why in skipped.items() if stop is not None and why == f"run.stop_after is {stop}"]
    if after:
        report.notes.append(f"the run stops after stage {stop} (run.stop_after); not run: {', '.join(after)}")
    unfinished = [s for s in plan.active(cfg) if read_manifest(run.stage_dir(s)) is None]
    live = holder(run.path)
    if unfinished:
        now = f"it is running now: {live.describe()}" if live not in (None, UNKNOWN) else "the run has not finished"
        report.notes.append(f"stages not completed ({now}): {', '.join(unfinished)}")
    return [s for s in plan.listed(cfg) if read_manifest(run.stage_dir(s)) is None]


def _attached(db: sqlite3.Connection) -> set[str]:
    return {name.removeprefix("s_") for _, name, _ in db.execute("PRAGMA database_list") if name.startswith("s_")}


def _stage_dirs(run: RunDir) -> list[Path]:
    root = run.path / "stages"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _check_outputs(run: RunDir, report: AuditReport) -> None:
    n = 0
    for stage_dir in _stage_dirs(run):
        manifest = read_manifest(stage_dir)
        if manifest is None:
            continue
        for out in manifest.outputs:
            n += 1
            path = run.path / out["path"]
            if not path.is_file():
                report.add("outputs", f"{out['path']}: listed by the {manifest.stage} manifest but missing")
            elif path.stat().st_size != out["bytes"] or sha256_file(path) != out["sha256"]:
                report.add("outputs", f"{out['path']}: sha256 differs from the {manifest.stage} manifest "
                                      f"(recorded {out['sha256'][:12]}, now {sha256_file(path)[:12]})")
    report.checked["output files"] = n


def _store_corpus(run: RunDir, db: sqlite3.Connection) -> None:
    """What the corpus shards hold, re-hashed, one image at a time."""
    shard_dir = run.stage_dir("corpus") / "shards"
    for shard in list_shards(shard_dir) if shard_dir.is_dir() else []:
        db.execute("BEGIN")
        db.executemany("INSERT INTO stored(image, shard, sha) VALUES (?, ?, ?)",
                       ((key, shard.name, sha256_bytes(data)) for key, _ext, data in iter_tar(shard.tar)))
        db.execute("COMMIT")


def _check_corpus(db: sqlite3.Connection, report: AuditReport) -> None:
    for image, n in db.execute("SELECT image, count(*) FROM keeps GROUP BY image HAVING count(*) > 1 ORDER BY image"):
        report.add("corpus", f"image {image}: {n} keep events", n - 1)
    # The sha256 an image's (last) keep event recorded, against the bytes in each shard that holds it.
    for image, shard, sha, known, want in db.execute(
            "SELECT s.image, s.shard, s.sha, r.image IS NOT NULL, r.sha FROM stored s LEFT JOIN recorded r "
            "ON r.image = s.image ORDER BY s.seq"):  # fmt: skip
        if not known:
            report.add("corpus", f"image {image} in shard {shard}: no keep event in the ledger")
        elif want is None:
            report.add("corpus", f"image {image}: its keep event records no sha256")
        elif sha != want:
            report.add("corpus", f"image {image} in shard {shard}: bytes hash to {sha[:12]}, the ledger recorded "
                                 f"{want[:12]}")
    for (image,) in db.execute("SELECT image FROM recorded r WHERE NOT EXISTS "
                               "(SELECT 1 FROM stored s WHERE s.image = r.image) ORDER BY image"):  # fmt: skip
        report.add("corpus", f"image {image}: kept in the ledger but not in any corpus shard")
    for image, n in db.execute("SELECT image, count(*) FROM stored GROUP BY image HAVING count(*) > 1 ORDER BY image"):
        report.add("corpus", f"image {image}: stored {n} times in the corpus")
    report.checked["corpus images"] = db.execute("SELECT count(*) FROM stored").fetchone()[0]


def _exists_in(stage: str, table: str, column: str, value: str) -> str:
    return f"EXISTS (SELECT 1 FROM s_{stage}.{table} WHERE {column} = {value})"


def _check_outcomes(db: sqlite3.Connection, report: AuditReport, corpus_ran: bool, stages: set[str]) -> None:
    missing = ("SELECT DISTINCT row_id FROM inputs i WHERE ingest AND NOT EXISTS "
               "(SELECT 1 FROM current c WHERE c.row_id = i.row_id)")  # fmt: skip
    if corpus_ran:
        for (row,) in db.execute(f"{missing} ORDER BY row_id LIMIT {KEPT_PER_CHECK}"):
            report.add("outcomes", f"input row {row}: no terminal outcome")
        _count_beyond(db, report, "outcomes", missing)
    else:  # rows still in the pipeline: each must have reached every stage that ran (completed)
        ran = [s for s in EVERY_IMAGE_STAGES if s in stages]
        gaps = " OR ".join(f"NOT {_exists_in(s, 'by_row', 'row_id', 'm.row_id')}" for s in ran) or "0"
        lost = f"SELECT row_id FROM ({missing}) m WHERE {gaps}"
        for (row,) in db.execute(f"{lost} ORDER BY row_id LIMIT {KEPT_PER_CHECK}"):
            report.add("outcomes", f"input row {row}: no terminal outcome, and missing at a stage that ran "
                                   f"({', '.join(ran)})")
        _count_beyond(db, report, "outcomes", lost)
        report.checked["rows still in the pipeline"] = db.execute(f"SELECT count(*) FROM ({missing})").fetchone()[0]
    multiple = "SELECT row_id FROM current WHERE row_id IS NOT NULL GROUP BY row_id HAVING count(*) > 1"
    for (row,) in db.execute(f"{multiple} ORDER BY row_id LIMIT {KEPT_PER_CHECK}"):
        report.add("outcomes", f"input row {row}: more than one terminal outcome")
    _count_beyond(db, report, "outcomes", multiple)
    report.checked["input rows"] = db.execute("SELECT count(DISTINCT row_id) FROM inputs WHERE ingest").fetchone()[0]


def _count_beyond(db: sqlite3.Connection, report: AuditReport, check: str, query: str) -> None:
    """Count, without listing, the rows of ``query`` beyond the first KEPT_PER_CHECK (already reported)."""
    n = db.execute(f"SELECT count(*) FROM ({query})").fetchone()[0]
    report.more(check, max(0, n - KEPT_PER_CHECK))


def _check_chains(db: sqlite3.Connection, report: AuditReport, stages: set[str]) -> None:
    present = ", ".join(_exists_in(s, "by_image", "image", "k.key") if s in stages else "0" for s in CHAIN_STAGES)
    query = (f"SELECT k.image, k.row_id, EXISTS (SELECT 1 FROM inputs i WHERE i.row_id = k.row_id AND i.has_url), "
             f"{present} FROM keeps k WHERE k.source = ? ORDER BY k.seq")  # fmt: skip
    n = 0
    for image, row, has_url, *at in db.execute(query, (POOL,)):
        n += 1
        if not has_url:
            report.add("chains", f"image {image}: its input row {row} has no ingest input event with a URL")
        missing = [s for s, ok in zip(CHAIN_STAGES, at, strict=True) if not ok]
        if missing:
            report.add("chains", f"image {image} (row {row}): no event at stage(s) {', '.join(missing)}")
    report.checked["chains"] = n


def _check_counts(run: RunDir, db: sqlite3.Connection, report: AuditReport) -> None:
    n = 0
    for stage_dir in _stage_dirs(run):
        manifest = read_manifest(stage_dir)
        if manifest is None or not (stage_dir / "ledger").is_dir():
            continue
        counts = manifest.counts
        drops = dict(db.execute("SELECT reason, count(*) FROM current WHERE stage = ? AND kind = 'drop' "
                                "GROUP BY reason", (manifest.stage,)).fetchall())  # fmt: skip
        recorded = {k: v for k, v in (counts.get("dropped") or {}).items() if v}
        n += 1
        if isinstance(counts.get("dropped"), dict) and recorded != drops:
            diff = {r: (recorded.get(r, 0), drops.get(r, 0)) for r in sorted(set(recorded) | set(drops))
                    if recorded.get(r, 0) != drops.get(r, 0)}
            report.add("counts", f"stage {manifest.stage}: drops per reason differ (manifest, ledger): {diff}")
        total = counts.get("input", counts.get("rows"))
        if (isinstance(total, int) and isinstance(counts.get("kept"), int)
                and counts["kept"] + sum(recorded.values()) != total):
            report.add("counts", f"stage {manifest.stage}: kept {counts['kept']} + dropped "
                                 f"{sum(recorded.values())} != input {total}")
        if manifest.stage == "corpus":
            n_keep = db.execute("SELECT count(*) FROM current WHERE stage = 'corpus' AND kind = 'keep'").fetchone()[0]
            if n_keep != counts.get("kept"):
                report.add("counts", f"stage corpus: manifest kept {counts.get('kept')}, ledger keeps {n_keep}")
    report.checked["stage manifests"] = n
