"""How a stage runs inside a run directory: skip when complete, resume per shard, manifest last.

A stage is a :class:`StageSpec`: a name, the config sections and code packages it depends on, its upstream
stages, and a function ``(StageContext) -> StageResult`` that calls the stage's pure core. :func:`run_stage`

1. requires every upstream manifest;
2. computes the stage key (config hash + code version + upstream digest) and returns the existing manifest
   when it matches (nothing is redone);
3. otherwise wipes outputs left by a different key (stale; a salvaging stage's stale attempt that differs only in
   its external inputs, or only in its upstream, is kept aside in ``previous/<stage>`` for the stage to take valid
   shards from), keeps completed shards of the same key, runs the function, and writes the manifest last.

A shard's outputs are the files named after it (``<shard>.<ext>``, in any folder of the stage) and its completion
marker ``_done/<shard>.json``, written last; a shard-wise stage records in that marker a fingerprint of the inputs
the shard was computed from (:attr:`ShardTracker.inputs`), so a later attempt can take the shard over instead of
computing it again (:func:`take_over_shards`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from infra.code import StageCode, changed, function_code, named
from infra.config import PipelineConfig, config_hash
from infra.console import Progress, duration
from infra.lineage import LedgerWriter, ledger_dir
from infra.lineage_index import index_stage
from infra.manifest import MANIFEST, StageManifest, cache_key, inputs_digest, read_manifest, write_manifest
from infra.memory import PeakMemory, gib, memory_budget, oom_kills, oom_kills_since
from infra.run import RunDir, now
from infra.stopping import hold_if_stopped_by, hold_if_stopping
from infra.storage import Markers, atomic_write_json, file_record, read_json

log = logging.getLogger("lvd")
FAULT_ENV = "LVD_FAULT"  # "<stage>" or "<stage>:<n>" (fail after n shards of the stage); for tests and chaos runs
KEY_FILE = "_key.json"
INPUTS_KEY = "_inputs"  # in a shard's completion marker: the fingerprint of the inputs it was computed from


class InjectedFault(RuntimeError):
    """Raised where ``LVD_FAULT`` asks for a failure (fault-injection tests)."""


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class StageStorageError(OSError):
    """A stage could not write its outputs (disk full, quota, read-only or forbidden output directory). Nothing
    it had not finished is visible: completed stages and committed shards are intact; resume once fixed."""

    def __init__(self, stage: str, run: RunDir, err: OSError):
        where = f" writing {err.filename}" if err.filename else ""
        super().__init__(err.errno, f"stage {stage!r} cannot write its outputs: {err.strerror or err}{where}. "
                                    f"Completed stages and committed shards are intact; free space or fix the "
                                    f"output directory, then run `lvd resume {run.run_id} --root {run.root}`")


_STORAGE_MESSAGES = {os.strerror(e): e for e in STORAGE_ERRNOS}


def storage_error(err: BaseException) -> OSError | None:
    """The storage failure behind ``err``, if any: an OSError with a storage errno anywhere in its chain (libraries
    such as pyarrow re-raise it with the errno only in the message)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return err
        for text, code in _STORAGE_MESSAGES.items():
            if text in str(err):
                return OSError(code, text, getattr(err, "filename", None))
        err = err.__cause__ or err.__context__
    return None


class StageInputError(RuntimeError):
    pass


@dataclass
class StageResult:
    # {"kept": n, "dropped": {reason: n}, ...}: what left the stage.
    counts: dict[str, Any] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(totals: dict[str, int]) -> dict[str, Any]:
    """Per-shard counts ({"kept": n, "drop:<reason>": n, other: n}) -> manifest counts with a "dropped" map."""
    dropped = {k.removeprefix("drop:"): v for k, v in sorted(totals.items()) if k.startswith("drop:")}
    rest = {k: v for k, v in totals.items() if not k.startswith("drop:")}
    return {**rest, "dropped": dropped}


def add_counts(totals: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        totals[k] = totals.get(k, 0) + v


def shard_items(counts: dict[str, Any]) -> tuple[int, str]:
    """What a shard's counts say it processed, for progress: (n, "URLs") at ingest, else (n, "images")."""
    if "rows" in counts:
        return int(counts["rows"]), "URLs"
    for key in ("images", "scored", "kept", "embedded"):
        if isinstance(counts.get(key), int):
            drops = sum(v for k, v in counts.items() if k.startswith("drop:") and isinstance(v, int))
            return counts[key] + (drops if key == "embedded" else 0), "images"
    return 0, "images"


@dataclass
class ShardTracker:
    """Per-shard completion within a stage: markers, events, progress and the fault-injection hook. `total`: the
    stage's shards when the caller knows them; otherwise those asked about before the first one is done."""

    stage: str
    stage_dir: Path
    rundir: RunDir | None = None
    total: int | None = None
    # Shard -> fingerprint of what it is computed from (upstream files, the images it skips), recorded in its marker.
    inputs: dict[str, str] | None = None
    _n_done: int = 0

    def __post_init__(self) -> None:
        self.markers = Markers(self.stage_dir)
        self.progress: Progress | None = None
        self._asked: set[str] = set()
        self._skipped = 0

    def is_done(self, shard: str) -> bool:
        done = self.markers.is_done(shard)
        first = shard not in self._asked  # (asked again, e.g. to size a stage's pool first: recorded once)
        if first:
            self._asked.add(shard)
            self._skipped += done
        self._open_progress()
        if done and first and self.rundir is not None:
            self.rundir.log_event("shard_skipped", self.stage, shard=shard)
        return done

    def info(self, shard: str) -> dict[str, Any]:
        """The shard's counts, as its work returned them."""
        return {k: v for k, v in self.markers.read(shard).items() if k != INPUTS_KEY}

    def ledger(self) -> LedgerWriter:
        return LedgerWriter(self.stage)

    def ledger_path(self, shard: str) -> Path:
        return ledger_dir(self.stage_dir) / f"{shard}.parquet"

    def run(self, shard: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Do ``work`` for a shard unless it is already done; returns the shard's counts either way."""
        if self.is_done(shard):
            return self.info(shard)
        counts = work()
        self.done(shard, counts)
        return counts

    def done(self, shard: str, info: dict[str, Any] | None = None) -> None:
        """Mark a shard complete (after all of its files are in place) and honour ``LVD_FAULT``."""
        fingerprint = (self.inputs or {}).get(shard)
        self.markers.mark(shard, {**(info or {}), INPUTS_KEY: fingerprint} if fingerprint else info)
        self._n_done += 1
        if self.rundir is not None:
            self.rundir.log_event("shard_done", self.stage, shard=shard)
        self._advance(info or {})
        check_fault(self.stage, self._n_done)

    def _open_progress(self) -> Progress:
        """The stage's progress display, opened when the first shard is asked about or done."""
        if self.progress is None:
            self.progress = Progress(self.stage, self.total, "shards")
        return self.progress

    def _advance(self, counts: dict[str, Any]) -> None:
        p = self._open_progress()
        if p.total is None and self._asked:
            p.total = len(self._asked)
        if p.done == 0 and self._skipped:  # shards finished by an earlier attempt: done, not part of the rate
            p.done = p.start_done = p.before = self._skipped
        n, p.items = shard_items(counts)
        p.advance(1, items=n)
        if p.total is not None and p.done >= p.total:
            p.close()  # the stage may go on (dedup's graph, ingest's summary): its end is logged by run_stage

    def close(self, failed: bool = False) -> None:
        if self.progress is not None:
            self.progress.close(failed)


def check_fault(stage: str, n_done: int | None = None) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != stage:
        return
    if (count == "" and n_done is None) or (count and n_done is not None and n_done >= int(count)):
        raise InjectedFault(f"injected fault in stage {stage!r} ({FAULT_ENV}={spec})")


@dataclass
class StageContext:
    run: RunDir
    cfg: PipelineConfig
    name: str
    upstream: dict[str, StageManifest]
    trackers: list[ShardTracker] = field(default_factory=list)
    base: str = ""  # the stage's base key (StageSpec.base_key): what a shard taken from elsewhere must share

    @property
    def dir(self) -> Path:
        return self.run.stage_dir(self.name)

    def upstream_dir(self, stage: str) -> Path:
        return self.run.stage_dir(stage)

    @property
    def previous(self) -> Path | None:
        """A stale attempt of a salvaging stage kept aside (:func:`_prepare`): shards to take over, or None."""
        path = previous_dir(self.run, self.name)
        return path if path.is_dir() else None

    def tracker(self, total: int | None = None, inputs: dict[str, str] | None = None) -> ShardTracker:
        """The stage's shard tracker; `total`: how many shards it will mark (for progress), where known; `inputs`:
        each shard's inputs fingerprint (:meth:`shard_inputs`), recorded in its marker. With `inputs`, completed
        shards of a stale attempt kept aside whose fingerprint is unchanged are taken over first."""
        tracker = ShardTracker(self.name, self.dir, self.run, total, inputs)
        if inputs and self.previous is not None:
            taken = take_over_shards(self.previous, self.dir, inputs)
            if taken:
                self.run.log_event("shards_taken_over", self.name, shards=len(taken))
                log.info("%s: %d of %d shards taken over from the previous attempt (their inputs are unchanged)",
                         self.name, len(taken), len(inputs))  # fmt: skip
        if inputs and self.base and self.cfg.run.reuse_runs:
            for donor in shard_donors(self.run, self.name, self.base):
                linked = take_over_shards(donor.stage_dir(self.name), self.dir, inputs, link=True)
                if linked:
                    self.run.log_event("shards_taken_over", self.name, shards=len(linked), from_run=donor.run_id)
                    log.info("%s: %d of %d shards taken from run %s (the same inputs and configuration; linked)",
                             self.name, len(linked), len(inputs), donor.run_id)  # fmt: skip
        self.trackers.append(tracker)
        return tracker

    def shard_inputs(self, shards: Iterable[str], stages: Iterable[str],
                     extra: dict[str, Iterable[str]] | None = None) -> dict[str, str]:  # fmt: skip
        """Per shard, a fingerprint of what it is computed from: the path and sha256 of every file named after it
        in the manifests of the upstream ``stages`` (its upstream shard), and ``extra[shard]`` (e.g. the ids of the
        images it skips), order-free."""
        files: dict[str, list[str]] = defaultdict(list)
        for stage in stages:
            for rec in self.upstream[stage].outputs:
                files[Path(rec["path"]).name.split(".", 1)[0]].append(f"{rec['path']} {rec['sha256']}")
        out = {}
        for name in shards:
            h = hashlib.sha256("\n".join(sorted(files.get(name, []))).encode())
            h.update(b"\0" + "\n".join(sorted(map(str, (extra or {}).get(name, ())))).encode())
            out[name] = h.hexdigest()
        return out

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)


@dataclass(frozen=True)
class StageSpec:
    name: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    # The stage's code, in its key: this function and the project source it reaches (`infra.code`).
    fn: Callable[[StageContext], StageResult]
    # Inputs from outside the run (a URL list the user may edit or append to): a fingerprint of their contents,
    # part of the stage's key, so a changed file makes the stage stale instead of silently reusing its outputs.
    external: Callable[[PipelineConfig], str] | None = None
    # Completed shards that stay valid when some inputs changed, checked shard by shard by the stage: a stale attempt
    # whose key differs only there is kept aside for the stage to take shards from (`StageContext.previous`) instead
    # of being wiped. "external": the external inputs (ingest: a URL list with rows added after the old ones leaves
    # the old shards' rows as they were); "upstream": the upstream stages (a shard-wise stage after a list grew or
    # `lvd retry-failed`: shards whose upstream shard and skipped images are unchanged, `StageContext.shard_inputs`).
    # Such shards are also taken from other runs under the same root (`run.reuse_runs`), as hard links.
    salvage: Literal["", "external", "upstream"] = ""
    # "upstream" salvage: the configuration a shard's outputs depend on, where narrower than `sections` (the dedup
    # stage's descriptors: `dedup.descriptor`; its threshold or evaluation sets change the graph, not them).
    shard_sections: tuple[str, ...] | None = None

    def code(self) -> StageCode:
        return function_code(self.fn)

    def base_key(self, cfg: PipelineConfig, upstream: dict[str, StageManifest]) -> str:
        """The key without what :attr:`salvage` lets change: the external inputs' fingerprint, or the upstream digest
        (and the configuration outside :attr:`shard_sections`)."""
        if self.salvage == "upstream":
            outside = self.external(cfg) if self.external is not None else ""
            sections = self.shard_sections or self.sections
            return cache_key(self.name, config_hash(cfg, sections), self.code().version, outside)
        return cache_key(self.name, config_hash(cfg, self.sections), self.code().version, inputs_digest(upstream))

    def key_parts(self, cfg: PipelineConfig, upstream: dict[str, StageManifest]) -> tuple[str, str, str]:
        return (*self.key_parts_own(cfg), self.inputs_digest(cfg, upstream))

    def key_parts_own(self, cfg: PipelineConfig) -> tuple[str, str]:
        """The key's configuration and code parts: known before the upstream stages are."""
        return config_hash(cfg, self.sections), self.code().version

    def key_detail(self, cfg: PipelineConfig, upstream: dict[str, StageManifest]) -> dict[str, Any]:
        """What the key's code and inputs parts are made of, recorded in the manifest so that a later attempt can
        say what changed (:func:`why_again`): each code file's digest, each upstream manifest's digest, the
        external files' fingerprint."""
        return {"code": self.code().files, "upstream": {n: m.digest() for n, m in sorted(upstream.items())},
                "external": self.external(cfg) if self.external is not None else None}

    def inputs_digest(self, cfg: PipelineConfig, upstream: dict[str, StageManifest]) -> str:
        """The upstream manifests' digest, with the external files' fingerprint when the stage has one."""
        digest = inputs_digest(upstream)
        if self.external is None:
            return digest
        return hashlib.sha256(f"{digest}:{self.external(cfg)}".encode()).hexdigest()


def load_upstream(spec: StageSpec, run: RunDir) -> dict[str, StageManifest]:
    upstream = {}
    for name in spec.upstream:
        manifest = read_manifest(run.stage_dir(name))
        if manifest is None:
            raise StageInputError(f"stage {spec.name!r} needs stage {name!r} to be complete in run {run.run_id!r}")
        upstream[name] = manifest
    return upstream


def stage_key(spec: StageSpec, run: RunDir, cfg: PipelineConfig) -> str:
    upstream = load_upstream(spec, run)
    return cache_key(spec.name, *spec.key_parts(cfg, upstream))


def _peak(peak: PeakMemory) -> dict[str, int]:
    return {"peak_memory": peak.peak} if peak.peak else {}


def _oom_note(before: tuple[str, int] | None) -> str:
    """What a failed stage's error does not say when a process of the run (a Dask or data-loader worker, a training
    process) was ended by the kernel's out-of-memory killer meanwhile: its error reads "worker died" or "killed by
    signal 9"."""
    oom = oom_kills_since(before)
    if oom is None:
        return ""
    n = oom[0]
    return (f" (meanwhile the kernel's out-of-memory killer ended {n} process{'es' if n != 1 else ''} of this run's "
            f"cgroup, counted in {oom[1]}; the run could use {memory_budget().describe()})")


def run_stage(spec: StageSpec, run: RunDir, cfg: PipelineConfig) -> StageManifest:
    hold_if_stopping()  # (Ctrl-C as the previous stage ended: this one does not start)
    upstream = load_upstream(spec, run)
    parts = spec.key_parts(cfg, upstream)
    key = cache_key(spec.name, *parts)
    stage_dir = run.stage_dir(spec.name)
    existing = read_manifest(stage_dir)
    if existing is not None and existing.key == key:
        run.log_event("skipped", spec.name, key=key)
        log.info("%s: complete already (same inputs and configuration), skipped", spec.name)
        return existing
    donor = completed_elsewhere(run, spec.name, key) if cfg.run.reuse_runs else None
    if donor is not None:
        manifest = take_from_run(donor, run, spec.name)
        run.log_event("skipped", spec.name, key=key, from_run=donor.run_id)
        log.info("%s: completed by run %s with the same inputs and configuration: its outputs are reused (linked)",
                 spec.name, donor.run_id)  # fmt: skip
        _index_lineage(run, spec.name)
        _refresh_domains(run, spec.name, cfg)
        if spec.salvage:  # a stale attempt kept aside has nothing left to give
            shutil.rmtree(previous_dir(run, spec.name), ignore_errors=True)
        return manifest
    started, t0 = now(), time.monotonic()
    base = spec.base_key(cfg, upstream)
    detail = spec.key_detail(cfg, upstream)
    ctx = StageContext(run, cfg, spec.name, upstream, base=base if spec.salvage == "upstream" else "")
    oom_before = oom_kills()  # (a child killed for memory fails the stage with the child's error: say why below)
    peak = PeakMemory()  # what the stage's work needed, for its events and the console
    try:
        why = why_again(spec, stage_dir, existing, parts, detail)
        _prepare(stage_dir, key, base, previous_dir(run, spec.name) if spec.salvage else None, parts)
        run.log_event("started", spec.name, key=key, **({"why": why} if why else {}))
        log.info("%s: started%s", spec.name, f" ({why})" if why else "")
        check_fault(spec.name)
        try:
            with peak:
                result = spec.fn(ctx)
        except BaseException:
            ctx.close(failed=True)
            raise
        ctx.close()
        manifest = StageManifest(
            stage=spec.name,
            run_id=run.run_id,
            config_hash=parts[0],
            code_version=parts[1],
            inputs_digest=parts[2],
            started_at=started,
            finished_at=now(),
            counts=result.counts,
            outputs=[file_record(p, run.path) for p in sorted(set(result.outputs))],
            extra=result.extra,
            key_detail=detail,
        )
        write_manifest(stage_dir, manifest)  # last: the stage's proof of completion
        if spec.salvage:  # what was not taken over goes, and the folder that held it when empty
            shutil.rmtree(previous_dir(run, spec.name), ignore_errors=True)
            with contextlib.suppress(OSError):
                previous_dir(run, spec.name).parent.rmdir()
    except BaseException as err:
        hold_if_stopped_by(err)  # a signal that stops the process: no failure to record
        error = f"{type(err).__name__}: {err}" + _oom_note(oom_before)
        with contextlib.suppress(OSError):  # the disk may be full or read-only: keep the original error
            run.log_event("failed", spec.name, key=key, error=error, **_peak(peak))
        log.error("%s: failed after %s: %s", spec.name, duration(time.monotonic() - t0), error)
        storage = storage_error(err)
        if storage is not None and not isinstance(err, StageStorageError):
            raise StageStorageError(spec.name, run, storage) from err
        raise
    run.log_event("completed", spec.name, key=key, counts=result.counts, **_peak(peak))
    log.info("%s: completed in %s%s, peak memory %s", spec.name, duration(time.monotonic() - t0),
             describe_counts(result.counts), gib(peak.peak))
    _index_lineage(run, spec.name)
    _refresh_domains(run, spec.name, cfg)
    return manifest


def _other_runs(run: RunDir, stage: str, **key: str) -> Iterator[RunDir]:
    """The other runs under ``run.root`` (by id) whose ``stage`` was started with the given ``key`` or ``base``
    (its small ``_key.json``, read before anything larger; unreadable: passed over)."""
    others = sorted(p.name for p in run.root.iterdir() if p.name != run.run_id) if run.root.is_dir() else []
    for name in others:
        other = RunDir(run.root, name)
        with contextlib.suppress(Exception):
            recorded = read_json(other.stage_dir(stage) / KEY_FILE)
            if all(recorded.get(k) == v for k, v in key.items()):
                yield other


def completed_elsewhere(run: RunDir, stage: str, key: str) -> RunDir | None:
    """Another run under ``run.root`` whose ``stage`` is complete with ``key``, every output file in place at its
    recorded size; the first by run id, or None."""
    for other in _other_runs(run, stage, key=key):
        with contextlib.suppress(Exception):  # an unreadable or half-written manifest of another run: not a donor
            manifest = read_manifest(other.stage_dir(stage))
            if manifest is not None and manifest.key == key and all(
                    (other.path / o["path"]).is_file() and (other.path / o["path"]).stat().st_size == o["bytes"]
                    for o in manifest.outputs):  # fmt: skip
                return other
    return None


def take_from_run(donor: RunDir, run: RunDir, stage: str) -> StageManifest:
    """``donor``'s completed ``stage`` as this run's: its files hard-linked (every file a stage writes is written
    once, to a temporary name renamed into place, so neither run's later writes reach the other's; the lineage index,
    a database updated in place, is copied), its manifest written last with this run's id. Whatever this run held
    for the stage before goes (it was stale or partial: the key differs)."""
    source, target = donor.stage_dir(stage), run.stage_dir(stage)
    manifest = read_manifest(source)
    assert manifest is not None
    shutil.rmtree(target, ignore_errors=True)
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if not path.is_file() or path.name.startswith(".") or rel == Path(MANIFEST):
            continue
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".sqlite":
            shutil.copy2(path, target / rel)
        else:
            _link(path, target / rel)
    mine = manifest.model_copy(update={"run_id": run.run_id, "extra": {**manifest.extra, "reused_from": donor.run_id}})
    write_manifest(target, mine)
    return mine


def describe_counts(counts: dict[str, Any]) -> str:
    """`, kept 270, dropped 12` (what left the stage), or the first few plain counts of a stage without them."""
    dropped = counts.get("dropped")
    if "kept" in counts:
        n = sum(dropped.values()) if isinstance(dropped, dict) else 0
        return f", kept {counts['kept']:,}" + (f", dropped {n:,}" if n else "")
    plain = [(k, v) for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)][:3]
    return "".join(f", {k} {v:,}" for k, v in plain)


def _index_lineage(run: RunDir, stage: str) -> None:
    """The stage's ledger is final: index it for `lvd lineage` (files indexed before, e.g. by a look-up while the
    stage ran, are not read again). Derived data: where this fails the first look-up builds it."""
    try:
        index_stage(run.stage_dir(stage))
    except (OSError, sqlite3.Error) as err:
        log.warning("%s: lineage index not written (%s); `lvd lineage` will build it", stage, err)


def _refresh_domains(run: RunDir, stage: str, cfg: PipelineConfig) -> None:
    """`lvd domains`' table, computed once when its inputs are final (derived: a failure leaves it to the command)."""
    from infra.domains import DOMAIN_INPUTS, domains  # pandas: not on the path of commands that only read manifests

    if stage not in DOMAIN_INPUTS:
        return
    try:
        domains(run.path, local=bool(cfg.ingest.local_roots))  # computed and stored unless current
    except (OSError, ValueError) as err:
        log.warning("per-host table not written (%s); `lvd domains` will compute it", err)


def take_over_shards(source: Path, stage_dir: Path, inputs: dict[str, str], link: bool = False) -> list[str]:
    """Completed shards of ``source`` (a stale attempt of the stage with the same base key; with ``link``, another
    run's attempt) whose marker records the fingerprint ``inputs[shard]`` has now, moved (``link``: hard-linked)
    into ``stage_dir``: every file named after the shard, then its marker (an interrupted take-over leaves each
    shard taken or to be computed). Returns the shards taken."""
    old, new = Markers(source), Markers(stage_dir)
    files: dict[str, list[Path]] = defaultdict(list)
    for path in source.rglob("*"):
        if path.is_file() and path.parent != old.dir:
            files[path.name.split(".", 1)[0]].append(path)
    taken = []
    for name, fingerprint in inputs.items():
        if new.is_done(name) or not old.is_done(name) or old.read(name).get(INPUTS_KEY) != fingerprint:
            continue
        try:
            move_shard(source, stage_dir, name, [p.relative_to(source) for p in files.get(name, [])], link)
        except FileNotFoundError:  # another run's stage being redone meanwhile: this shard is computed here
            continue
        taken.append(name)
    return taken


def shard_donors(run: RunDir, stage: str, base: str) -> list[RunDir]:
    """Other runs under ``run.root`` whose ``stage`` folder (complete, partial or stale) was started with the base
    key ``base``: their completed shards are valid here wherever their recorded inputs match."""
    return list(_other_runs(run, stage, base=base))


def move_shard(source: Path, stage_dir: Path, name: str, files: Iterable[Path], link: bool = False) -> None:
    """A completed shard's ``files`` (relative to the stage folder; those present) moved (``link``: hard-linked,
    copied across file systems) from ``source`` into ``stage_dir``, its completion marker last."""
    for rel in [*files, Markers(source).path(name).relative_to(source)]:
        if (source / rel).is_file():
            (stage_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            if link:
                _link(source / rel, stage_dir / rel)
            else:
                (source / rel).replace(stage_dir / rel)


def _link(source: Path, target: Path) -> None:
    """``target`` as a hard link of ``source`` (a copy where links cannot be made), replacing what was there."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed there
        shutil.copy2(source, target)


def previous_dir(run: RunDir, stage: str) -> Path:
    """Where a salvaging stage's stale attempt waits to be taken from (outside ``stages/``: nothing that reads a
    run's stages sees it)."""
    return run.path / "previous" / stage


def why_again(spec: StageSpec, stage_dir: Path, existing: StageManifest | None, parts: tuple[str, str, str],
              detail: dict[str, Any]) -> str:  # fmt: skip
    """Why a stage completed or started before under another key is computed again, in words ("" when it never
    was): which of its configuration, code files, upstream stages and outside files changed since."""
    if existing is not None:
        old = (existing.config_hash, existing.code_version, existing.inputs_digest)
        before, since = existing.key_detail, "since it completed"
    else:
        recorded = read_json(stage_dir / KEY_FILE) if (stage_dir / KEY_FILE).is_file() else {}
        if not recorded or recorded.get("key") == cache_key(spec.name, *parts):
            return ""
        old, before, since = tuple(recorded.get("parts") or ("", "", "")), {}, "since its interrupted attempt"
    reasons = []
    if old[0] != parts[0]:
        reasons.append(f"its configuration ({', '.join(spec.sections)}) changed")
    if old[1] != parts[1]:
        files = changed(before["code"], detail["code"]) if "code" in before else []
        reasons.append(f"its code changed ({named(files)})" if files else "its code changed")
    if old[2] != parts[2]:
        n = len(reasons)
        if "upstream" in before:
            stages = changed(before["upstream"], detail["upstream"])
            reasons += [f"upstream {'stages' if len(stages) > 1 else 'stage'} {', '.join(stages)} changed"] if stages else []
            reasons += ["the files it reads from outside the run changed"] if before["external"] != detail["external"] else []
        if len(reasons) == n:
            reasons.append("its inputs changed")
    return f"computed again: {' and '.join(reasons)} {since}" if reasons else ""


def _prepare(stage_dir: Path, key: str, base: str = "", previous: Path | None = None,
             parts: tuple[str, str, str] | None = None) -> None:  # fmt: skip
    """Keep partial outputs of the same key (shard resume); wipe those of another key (stale), or, for a salvaging
    stage (``previous`` given) whose stale attempt has the same ``base`` key, move them to ``previous`` (unless an
    older attempt already waits there). Temporary files of an interrupted attempt (never read: see
    `infra.storage.temp_for`) are removed before the stage starts."""
    key_file = stage_dir / KEY_FILE
    if previous is not None and previous.exists():
        kept = previous / KEY_FILE
        if not kept.is_file() or read_json(kept).get("base") != base:  # configured differently since: nothing to take
            shutil.rmtree(previous)
    if stage_dir.exists():
        old = read_json(key_file) if key_file.is_file() else {}
        if old.get("key") != key:
            if previous is not None and base and old.get("base") == base and not previous.exists():
                previous.parent.mkdir(parents=True, exist_ok=True)
                stage_dir.rename(previous)
            else:
                shutil.rmtree(stage_dir)
        else:
            for tmp in stage_dir.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not key_file.is_file():
        atomic_write_json(key_file, {"key": key, "base": base, **({"parts": list(parts)} if parts else {})})


def stage_state(run: RunDir, spec: StageSpec, cfg: PipelineConfig) -> str:
    """completed | stale | partial | pending, from the files alone."""
    stage_dir = run.stage_dir(spec.name)
    manifest = read_manifest(stage_dir)
    if manifest is not None:
        try:
            return "completed" if manifest.key == stage_key(spec, run, cfg) else "stale"
        except StageInputError:
            return "stale"
    if stage_dir.exists():
        return "partial"
    return "pending"
