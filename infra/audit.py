"""`lvd audit RUN_ID`: check a finished (or partial) run against its own records, naming every discrepancy.

Checks, each independent of the others so that one corruption does not hide another:

- ``outputs``: every output file a stage manifest lists exists with the recorded size and sha256;
- ``corpus``: every corpus image re-hashed against the sha256 its ledger ``keep`` event recorded; every keep has
  its image in the corpus shards and every image in the shards has exactly one keep;
- ``outcomes``: every input URL row has exactly one terminal outcome (drop or keep);
- ``chains``: every kept pool image has a complete chain back to its URL (an ingest ``input`` event with the URL,
  and an event at every curation stage it passed);
- ``counts``: each manifest's drop counts per reason equal its ledger's, and kept + dropped add up to the
  stage's input.

The audit reads only the run directory (ledger, manifests, shards); it never writes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.dataset as ds

from infra.lineage import POOL, Ledger, check_terminal_outcomes, superseded
from infra.manifest import read_manifest
from infra.run import RunDir
from infra.shards import iter_tar, list_shards
from infra.storage import sha256_bytes, sha256_file

# Stages every kept pool image passes through and that record at least one event about it.
CHAIN_STAGES = ("ingest", "nsfw", "faces", "dedup", "retrieve")


@dataclass
class AuditReport:
    checked: dict[str, int] = field(default_factory=dict)  # what was checked, per check
    problems: list[tuple[str, str]] = field(default_factory=list)  # (check, message)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, check: str, message: str) -> None:
        self.problems.append((check, message))

    def format(self, limit: int = 50) -> str:
        lines = [f"checked: {', '.join(f'{k} {v}' for k, v in self.checked.items())}"]
        for check, msg in self.problems[:limit]:
            lines.append(f"FAIL [{check}] {msg}")
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        lines.append("audit: OK" if self.ok else f"audit: {len(self.problems)} discrepancies")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"ok": self.ok, "checked": self.checked,
                "problems": [{"check": c, "message": m} for c, m in self.problems]}


def audit_run(run: RunDir) -> AuditReport:
    report = AuditReport()
    ledger = Ledger(run.path)
    _check_outputs(run, report)
    _check_corpus(run, ledger, report)
    _check_outcomes(ledger, report)
    _check_chains(ledger, report)
    _check_counts(run, ledger, report)
    return report


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


def _check_corpus(run: RunDir, ledger: Ledger, report: AuditReport) -> None:
    keeps = ledger.query(ds.field("kind") == "keep", ["image_id", "detail", "stage"])
    recorded: dict[str, str | None] = {}
    for image_id, detail in zip(keeps["image_id"], keeps["detail"], strict=True):
        if image_id in recorded:
            report.add("corpus", f"image {image_id}: more than one keep event")
        recorded[image_id] = (json.loads(detail) if detail else {}).get("sha256")
    seen: Counter[str] = Counter()
    shard_dir = run.stage_dir("corpus") / "shards"
    for shard in list_shards(shard_dir) if shard_dir.is_dir() else []:
        for key, _ext, data in iter_tar(shard.tar):
            seen[key] += 1
            if key not in recorded:
                report.add("corpus", f"image {key} in shard {shard.name}: no keep event in the ledger")
            elif recorded[key] is None:
                report.add("corpus", f"image {key}: its keep event records no sha256")
            elif sha256_bytes(data) != recorded[key]:
                report.add("corpus", f"image {key} in shard {shard.name}: bytes hash to {sha256_bytes(data)[:12]}, "
                                     f"the ledger recorded {recorded[key][:12]}")
    for key in sorted(set(recorded) - set(seen)):
        report.add("corpus", f"image {key}: kept in the ledger but not in any corpus shard")
    for key, n in sorted(seen.items()):
        if n > 1:
            report.add("corpus", f"image {key}: stored {n} times in the corpus")
    report.checked["corpus images"] = sum(seen.values())


def _check_outcomes(ledger: Ledger, report: AuditReport) -> None:
    check = check_terminal_outcomes(ledger)
    for row in check.missing[:20]:
        report.add("outcomes", f"input row {row}: no terminal outcome")
    for row in check.multiple[:20]:
        report.add("outcomes", f"input row {row}: more than one terminal outcome")
    extra = len(check.missing) + len(check.multiple) - min(len(check.missing), 20) - min(len(check.multiple), 20)
    if extra:
        report.add("outcomes", f"{extra} more input rows without exactly one terminal outcome")
    report.checked["input rows"] = check.n_rows


def _check_chains(ledger: Ledger, report: AuditReport) -> None:
    kept = ledger.query((ds.field("kind") == "keep") & (ds.field("source") == POOL), ["row_id", "image_id"])
    if kept.empty:
        report.checked["chains"] = 0
        return
    rows = [int(r) for r in kept["row_id"]]
    inputs = ledger.query((ds.field("reason") == "input") & ds.field("row_id").isin(rows), ["row_id", "url"])
    urls = dict(zip(inputs["row_id"].astype(int), inputs["url"], strict=True))
    events = ledger.query(ds.field("image_id").isin(list(kept["image_id"])), ["image_id", "stage"])
    stages = events.groupby("image_id")["stage"].agg(set).to_dict()
    for row, image_id in zip(rows, kept["image_id"], strict=True):
        if not urls.get(row):
            report.add("chains", f"image {image_id}: its input row {row} has no ingest input event with a URL")
        missing = [s for s in CHAIN_STAGES if s not in stages.get(image_id, set())]
        if missing:
            report.add("chains", f"image {image_id} (row {row}): no event at stage(s) {', '.join(missing)}")
    report.checked["chains"] = len(rows)


def _check_counts(run: RunDir, ledger: Ledger, report: AuditReport) -> None:
    n = 0
    for stage_dir in _stage_dirs(run):
        manifest = read_manifest(stage_dir)
        if manifest is None or not (stage_dir / "ledger").is_dir():
            continue
        counts = manifest.counts
        events = ledger.query(ds.field("stage") == manifest.stage, ["row_id", "kind", "reason", "stage", "attempt"])
        if manifest.stage == "ingest" and not events.empty:
            events = events[~superseded(events, ledger)]
        drops = events[events["kind"] == "drop"]["reason"].value_counts().to_dict()
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
            n_keep = int((events["kind"] == "keep").sum())
            if n_keep != counts.get("kept"):
                report.add("counts", f"stage corpus: manifest kept {counts.get('kept')}, ledger keeps {n_keep}")
    report.checked["stage manifests"] = n
