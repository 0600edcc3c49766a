"""Lineage at scale: `lvd lineage` (by image id, id prefix, row and URL), `lvd domains`, `lvd status` and `lvd audit`
on runs scaled from a real run's ledger to two sizes, each command timed cold and warm in fresh processes, with peak
RSS, and the growth between the sizes.

    python bench/lineage.py --rows 100000 --rows 1000000 [--source RUN_DIR] [--work DIR]

The scaled run is the source run's ledger repeated: copy ``c`` of every event with its row ids shifted by ``c`` times
the source's rows, its image ids replaced (sha256 of the id and ``c``), its URLs given the host ``c<c>.<host>``, and
every cross-reference in ``detail`` remapped alike (image ids, ``*_row``, the corpus shard and the sha256 of the
stored bytes); per-shard ledger files become shards of their own, and the ledgers of the whole-pool stages (dedup,
retrieve, rebalance, corpus, ingest's ``_dedup``) hold every copy, in parts of ``PART_EVENTS`` events as those stages
write them (from a source of either layout). It is written with the project's writers
(:func:`infra.lineage.write_ledger`, ``infra.lineage.LedgerParts``, ``infra.shards.ShardWriter`` for the corpus
shards, whose images carry a per-copy trailer so that every copy has its own bytes), with manifests scaled to match,
and indexed as the stage-completion hook does (the time and size are printed). Other outputs of the source (image
shards, embeddings, ...) are not copied: the audit's output check hashes the ledger and corpus files only.

Without ``--source``, the demo's curation is run first (`lvd run configs/demo.yaml run.stop_after=corpus`, ~8 min on
2 cores). "cold": the run's files are dropped from the page cache (posix_fadvise) before the command; Python and
its libraries stay cached. "warm": the median of 3 runs after it (15 for the look-ups alone), with its CPU time
(user + system, from wait4: what a busy machine disturbs least). "look-up alone": the time find_chain takes in a
fresh process once its modules are imported (the part that depends on the run's size). The baseline: `Ledger.chain`,
the full scan that `lvd lineage` did before the index, timed the same way. `lvd domains` reads the per-host table
that the ingest and corpus stages store when they complete (built here as the hook does, its time printed);
"baseline: domains computed" is `domain_stats` over every ingest event, what the command did before the table.
Project sources are byte-compiled first (PYTHONPYCACHEPREFIX in the work folder), so start-up is import time, not
compile time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.domains import domains  # noqa: E402
from infra.lineage import Ledger, LedgerParts, ledger_dir, write_ledger  # noqa: E402
from infra.lineage_index import INDEX_NAME, index_stage  # noqa: E402
from infra.manifest import read_manifest, write_manifest  # noqa: E402
from infra.shards import ShardWriter, list_shards  # noqa: E402
from infra.storage import file_record  # noqa: E402

LOOKUP_REPEATS = 5  # the look-ups alone (0.03-0.1 s) run 5x as often: their median of 3 moved by 50 % at load 4
HEX64 = re.compile(r"^[0-9a-f]{64}$")
MARK = "\x00{}\x00"


# -- scaling ----------------------------------------------------------------------------------------------------------


def _scale_counts(value: object, k: int) -> object:
    if isinstance(value, bool) or not isinstance(value, int | dict):
        return value
    return {a: _scale_counts(b, k) for a, b in value.items()} if isinstance(value, dict) else value * k


class Scaler:
    """Copy ``c`` of the source run's ids, URLs and details (copy 0 is the source itself)."""

    def __init__(self, source: Path):
        self.source = source
        events = Ledger(source).query(columns=["row_id", "image_id", "url", "detail"])
        self.n_rows = int(events["row_id"].max()) + 1
        self.templates: dict[str, tuple[str, list[tuple[str, object]]]] = {}
        for text in set(events["detail"].dropna()):
            self.templates[text] = self._template(text)
        refs = {v for _, refs in self.templates.values() for kind, v in refs if kind == "image"}
        self.images = sorted(set(events["image_id"].dropna()) | refs)
        self.urls = sorted(set(events["url"].dropna()) | {v for _, r in self.templates.values()
                                                          for kind, v in r if kind == "url"})  # fmt: skip
        self.corpus = [(s.name, s.read_table(), dict((k, b) for k, _e, b in s))
                       for s in list_shards(source / "stages" / "corpus" / "shards")]  # fmt: skip
        self.stored = {sha: img[key] for _, t, img in self.corpus for key, sha in zip(t["image_id"], t["sha256"],
                                                                                         strict=True)}  # fmt: skip

    @staticmethod
    def _template(text: str) -> tuple[str, list[tuple[str, object]]]:
        detail = json.loads(text)
        if json.dumps(detail, sort_keys=True) != text:  # not from the project's writer: left as it is
            return text.replace("{", "{{").replace("}", "}}"), []
        refs: list[tuple[str, object]] = []
        for key, value in detail.items():
            kind = ("sha" if key == "sha256" else "image" if isinstance(value, str) and HEX64.match(value)
                    else "row" if key.endswith("_row") and isinstance(value, int) and not isinstance(value, bool)
                    else "shard" if key == "shard" else "url" if key == "url" and isinstance(value, str) else None)  # fmt: skip
            if kind:
                detail[key] = MARK.format(len(refs))
                refs.append((kind, value))
        text = json.dumps(detail, sort_keys=True).replace("{", "{{").replace("}", "}}")
        for i in range(len(refs)):
            text = text.replace(json.dumps(MARK.format(i)), "{}")
        return text, refs

    def image(self, image_id: str, c: int) -> str:
        return image_id if c == 0 else hashlib.sha256(f"{image_id}/{c}".encode()).hexdigest()

    def url(self, url: str, c: int) -> str:
        if c == 0:
            return url
        return url.replace("://", f"://c{c}.", 1) if "://" in url else (url + f"#c{c}" if url.strip() else url)

    def trailer(self, c: int) -> bytes:
        return b"" if c == 0 else f"lvd-bench-copy-{c}".encode()

    def shard(self, name: str, c: int) -> str:
        return f"{c * len(self.corpus) + [n for n, _, _ in self.corpus].index(name):05d}"

    def _ref(self, kind: str, value: object, c: int) -> str:
        if kind == "row":
            return str(int(value) + c * self.n_rows)
        new = {"image": lambda: self.image(value, c), "url": lambda: self.url(value, c),
               "shard": lambda: self.shard(value, c) if c else value,
               "sha": lambda: hashlib.sha256(self.stored[value] + self.trailer(c)).hexdigest()
               if c and value in self.stored else value}[kind]()  # fmt: skip
        return json.dumps(new)

    def _column(self, col: pa.ChunkedArray, values: list[str], new: list[str]) -> pa.Array:
        return pc.take(pa.array(new, pa.string()), pc.index_in(col, value_set=pa.array(values, pa.string())))

    def detail(self, text: str | None, c: int) -> str | None:
        if text is None:
            return None
        template, refs = self.templates[text]
        return template.format(*(self._ref(kind, value, c) for kind, value in refs))

    def events(self, table: pa.Table, c: int) -> pa.Table:
        if c == 0:
            return table
        new = {"row_id": pc.add(table["row_id"], c * self.n_rows),
               "image_id": self._column(table["image_id"], self.images, [self.image(i, c) for i in self.images]),
               "detail": pa.array([self.detail(d, c) for d in table["detail"].to_pylist()], pa.string()),
               "url": self._column(table["url"], self.urls, [self.url(u, c) for u in self.urls])}  # fmt: skip
        for name, column in new.items():
            table = table.set_column(table.schema.get_field_index(name), name, column)
        return table


def scale(source: Path, root: Path, rows: int) -> tuple[Path, int]:
    """Write the run scaled to at least ``rows`` input rows under ``root``; returns it and its number of copies."""
    sc = Scaler(source)
    copies = math.ceil(rows / sc.n_rows)
    run = root / f"{source.name}-x{copies}"
    shutil.rmtree(run, ignore_errors=True)
    (run / "stages").mkdir(parents=True)
    for name in ("config.yaml", "run.json", "events.jsonl"):
        (run / name).write_text((source / name).read_text().replace(source.name, run.name))
    outputs: dict[str, list[Path]] = {}
    for stage_dir in sorted(p for p in (source / "stages").iterdir() if ledger_dir(p).is_dir()):
        files = sorted(ledger_dir(stage_dir).glob("*.parquet"))
        per_shard = [f for f in files if f.stem.isdigit()]
        for c in range(copies):
            for i, f in enumerate(per_shard):
                out = ledger_dir(run / "stages" / stage_dir.name) / f"{c * len(per_shard) + i:05d}.parquet"
                outputs.setdefault(stage_dir.name, []).append(write_ledger(sc.events(pq.read_table(f), c), out))
        whole = {}  # a whole-pool ledger (its parts, or the one file of a run from before parts): all copies in it
        for f in (f for f in files if not f.stem.isdigit()):
            whole.setdefault(re.sub(r"-\d+$", "", f.stem), []).append(f)
        for name, parts in whole.items():
            writer = LedgerParts(stage_dir.name, ledger_dir(run / "stages" / stage_dir.name), name=name)
            for c in range(copies):
                for f in parts:
                    writer.extend(sc.events(pq.read_table(f), c))
            outputs.setdefault(stage_dir.name, []).extend(writer.close())
    outputs.setdefault("corpus", []).extend(_corpus(sc, run, copies))
    _manifests(source, run, copies, outputs)
    return run, copies


def _corpus(sc: Scaler, run: Path, copies: int) -> list[Path]:
    written = []
    for c in range(copies):
        for name, table, images in sc.corpus:
            schema = pq.read_schema(sc.source / "stages" / "corpus" / "shards" / f"{name}.parquet")
            w = ShardWriter(run / "stages" / "corpus" / "shards", sc.shard(name, c) if c else name)
            for r in table.to_dict("records"):
                key, ext = r.pop("image_id"), r.pop("ext")
                del r["sha256"], r["bytes"]  # the writer records those of the bytes it stores
                row = r.get("row_id")
                r["row_id"] = None if row is None or math.isnan(row) else int(row) + c * sc.n_rows
                w.add(sc.image(key, c), images[key] + sc.trailer(c), ext, **r)
            w.close(schema)
            written += [w.tar_path, w.table_path]
    return written


def _manifests(source: Path, run: Path, copies: int, outputs: dict[str, list[Path]]) -> None:
    for stage_dir in sorted(p for p in (source / "stages").iterdir() if p.is_dir()):
        m = read_manifest(stage_dir)
        if m is None:
            continue
        files = outputs.get(stage_dir.name, [])
        (run / "stages" / stage_dir.name).mkdir(parents=True, exist_ok=True)
        write_manifest(run / "stages" / stage_dir.name, m.model_copy(update={
            "run_id": run.name, "counts": _scale_counts(m.counts, copies),
            "outputs": [file_record(p, run) for p in sorted(set(files))]}))  # fmt: skip


# -- measuring --------------------------------------------------------------------------------------------------------


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=str(REPO), PYTHONPYCACHEPREFIX=str(work / "pycache"), NO_ALBUMENTATIONS_UPDATE="1")
    return env


def evict(path: Path) -> None:
    """Drop a folder's files from the page cache (cold reads)."""
    for f in (p for p in path.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# Started from this small process, not from the bench: a child's peak RSS (ru_maxrss) starts at its parent's when
# it forks, and the bench holds the source run in memory.
LAUNCHER = """
import json, os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"s": time.perf_counter() - t, "cpu": usage.ru_utime + usage.ru_stime, "kb": usage.ru_maxrss,
               "rc": os.waitstatus_to_exitcode(status)}, f)
"""


def timed(argv: list[str], env: dict[str, str], work: Path) -> tuple[float, float, int, str, float]:
    """(seconds, peak RSS in MB, exit code, first line of output, CPU seconds) of one fresh process."""
    report = work / "timed.json"
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report), *argv], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True)  # fmt: skip
    got = json.loads(report.read_text())
    text = proc.stdout.decode(errors="replace")
    first = (text.strip().splitlines() or [""])[0][:70]
    inner = re.search(r"^SECONDS=([0-9.]+)$", text, re.M)  # a command that times its own work (no start-up)
    cpu = re.search(r"^CPU=([0-9.]+)$", text, re.M)
    return float(inner[1]) if inner else got["s"], got["kb"] / 1024, got["rc"], first, float(cpu[1]) if cpu else got["cpu"]


def commands(run: Path, sc_keys: dict[str, str]) -> dict[str, list[str]]:
    py = [sys.executable]
    cli = [*py, "-m", "flows.cli"]
    root = ["--root", str(run.parent)]
    scan = ("from pathlib import Path; from infra.lineage import Ledger; "
            "c = Ledger(Path({!r})).chain({}={!r}); print(len(c), 'events')")  # fmt: skip
    inner = ("import time; from pathlib import Path; from infra.lineage_lookup import find_chain; "
             "t, c0 = time.perf_counter(), time.process_time(); c, _ = find_chain(Path({!r}), {!r}); "
             "print(len(c), 'events'); print(f'SECONDS={{time.perf_counter() - t:.4f}}'); "
             "print(f'CPU={{time.process_time() - c0:.4f}}')")  # fmt: skip
    return {
        "start-up (lvd --help)": [*cli, "--help"],
        "look-up alone, by image id": [*py, "-c", inner.format(str(run), sc_keys["image"])],
        "look-up alone, by row": [*py, "-c", inner.format(str(run), f"row:{sc_keys['row']}")],
        "look-up alone, by URL": [*py, "-c", inner.format(str(run), sc_keys["url"])],
        "lineage <image id>": [*cli, "lineage", run.name, sc_keys["image"], *root],
        "lineage <12-digit prefix>": [*cli, "lineage", run.name, sc_keys["image"][:12] + "…", *root],
        "lineage row:<N>": [*cli, "lineage", run.name, f"row:{sc_keys['row']}", *root],
        "lineage <dropped URL>": [*cli, "lineage", run.name, sc_keys["url"], *root],
        "domains": [*cli, "domains", run.name, *root],
        "baseline: domains computed": [*py, "-c", f"from infra.domains import domain_stats, format_domains; "
                                       f"print(format_domains(domain_stats({str(run)!r})).splitlines()[-1])"],
        "status": [*cli, "status", run.name, *root],
        "audit": [*cli, "audit", run.name, *root],
        "baseline: full scan by image id": [*py, "-c", scan.format(str(run), "image_id", sc_keys["image"])],
        "baseline: full scan by URL": [*py, "-c", scan.format(str(run), "url", sc_keys["url"])],
    }


def keys_of(source: Path, copy: int, sc: Scaler) -> dict[str, str]:
    """A kept pool image, its row, and a URL dropped at download, in copy ``copy``."""
    ev = Ledger(source).query(columns=["row_id", "image_id", "stage", "kind", "reason", "url", "source"])
    kept = ev[(ev["kind"] == "keep") & (ev["source"] == "pool")].iloc[len(ev) % 7]
    http = ev[(ev["stage"] == "ingest") & ev["reason"].str.startswith("http_")].iloc[0]
    url = ev[(ev["reason"] == "input") & (ev["row_id"] == http["row_id"])]["url"].iloc[0]
    return {"image": sc.image(kept["image_id"], copy), "row": str(int(kept["row_id"]) + copy * sc.n_rows),
            "url": sc.url(url, copy)}  # fmt: skip


def measure(runs: dict[int, tuple[Path, dict[str, str]]], env: dict[str, str], repeats: int, work: Path,
            only: str | None = None) -> dict[str, dict[int, dict]]:
    """Each command on every size in turn (cold, then the warm repeats alternating between sizes), so that a change
    of the machine's load falls on both sizes alike."""
    names = [n for n in commands(*next(iter(runs.values()))) if only is None or re.search(only, n)]
    out: dict[str, dict[int, dict]] = {}
    for name in names:
        argv = {n: commands(run, keys)[name] for n, (run, keys) in runs.items()}
        cold = {}
        for n, (run, _) in runs.items():
            evict(run)
            cold[n] = timed(argv[n], env, work)
        warm: dict[int, list] = {n: [] for n in runs}
        for _ in range(1 if name == "audit" else repeats * (LOOKUP_REPEATS if name.startswith("look-up") else 1)):
            for n in runs:
                warm[n].append(timed(argv[n], env, work))
        out[name] = {n: {"cold": cold[n][0], "warm": statistics.median(w[0] for w in warm[n]),
                         "cpu": statistics.median(w[4] for w in warm[n]), "rss": max([cold[n][1], *(w[1] for w in warm[n])]),
                         "rc": cold[n][2], "out": cold[n][3]} for n in runs}  # fmt: skip
        cells = "  ".join(f"{r['cold']:6.2f} {r['warm']:6.2f} {r['cpu']:5.2f} {r['rss']:5.0f}" for r in out[name].values())
        print(f"  {name:<34} {cells}  {out[name][max(runs)]['out'][:40]}", flush=True)
    return out


def build(source: Path, work: Path, rows: int) -> tuple[Path, int, dict[str, float]]:
    done = work / f"scaled-{rows}" / "built.json"
    if done.is_file():  # kept by an earlier --keep run: measured again as it is
        info = json.loads(done.read_text())
        return Path(info.pop("run")), info.pop("copies"), info
    t0 = time.perf_counter()
    run, copies = scale(source, work / f"scaled-{rows}", rows)
    t1 = time.perf_counter()
    for stage in sorted(p for p in (run / "stages").iterdir() if ledger_dir(p).is_dir()):
        index_stage(stage)  # what the stage-completion hook does
    t2 = time.perf_counter()
    domains(run)  # the ingest and corpus stages' completion hook: `lvd domains`' stored table
    t3 = time.perf_counter()
    n_events = sum(pq.ParquetFile(f).metadata.num_rows for f in run.glob("stages/*/ledger/*.parquet"))
    info = {"write_s": t1 - t0, "index_s": t2 - t1, "domains_s": t3 - t2, "events": n_events,
            "index_mb": sum(p.stat().st_size for p in run.glob(f"stages/*/{INDEX_NAME}")) / 2**20,
            "ledger_mb": sum(p.stat().st_size for p in run.glob("stages/*/ledger/*.parquet")) / 2**20,
            "ledger_files": len(list(run.glob("stages/*/ledger/*.parquet")))}  # fmt: skip
    done.write_text(json.dumps({"run": str(run), "copies": copies, **info}))
    return run, copies, info


def demo_source(work: Path, env: dict[str, str]) -> Path:
    root = work / "source"
    print(f"no --source: running the demo's curation into {root} (about 8 minutes on 2 cores)", flush=True)
    subprocess.run([sys.executable, "-m", "flows.cli", "run", "configs/demo.yaml", "run.stop_after=corpus",
                    f"run.root={root}"], env=env, cwd=REPO, check=True)  # fmt: skip
    return next(p for p in root.iterdir() if (p / "stages" / "corpus" / "manifest.json").is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, action="append", help="input rows of a scaled run (give two sizes)")
    ap.add_argument("--source", type=Path, help="a real run (curated through `corpus`) to scale")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "lineage")
    ap.add_argument("--repeats", type=int, default=3, help="warm runs per command (median)")
    ap.add_argument("--keep", action="store_true", help="keep the scaled runs (a later call measures them again)")
    ap.add_argument("--only", help="measure only the commands whose name matches this regular expression")
    args = ap.parse_args()
    sizes = sorted(args.rows or [100_000, 1_000_000])
    args.work.mkdir(parents=True, exist_ok=True)
    env = _env(args.work)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "infra", "flows", "curation", "training",
                    "evaluation"], env=env, cwd=REPO, check=True)  # fmt: skip
    source = args.source or demo_source(args.work, env)
    print(f"source run {source}; load: {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs", flush=True)
    runs = {}
    for rows in sizes:
        run, copies, info = build(source, args.work, rows)
        sc = Scaler(source)
        n = copies * sc.n_rows
        print(f"{n:,} rows ({copies} copies), {info['events']:,} events in {info['ledger_files']:,} ledger files "
              f"({info['ledger_mb']:.0f} MB); written in {info['write_s']:.0f} s; index built in "
              f"{info['index_s']:.1f} s, {info['index_mb']:.1f} MB ({info['index_mb'] / n * 1e6:.0f} MB per million "
              f"rows); domains table in {info.get('domains_s', float('nan')):.1f} s", flush=True)  # fmt: skip
        runs[n] = (run, keys_of(source, copies // 2, sc))
    head = "  ".join(f"{f'{n:,} rows: cold  warm   cpu    MB':>30}" for n in runs)
    print(f"\n  {'command (s; warm CPU s; peak RSS)':<34} {head}", flush=True)
    results = measure(runs, env, args.repeats, args.work, args.only)
    if len(runs) >= 2:
        n1, n2 = min(runs), max(runs)
        print(f"\ngrowth {n1:,} -> {n2:,} rows (x{n2 / n1:.0f}; logarithmic growth would be at most "
              f"x{math.log(n2) / math.log(n1):.2f}):")  # fmt: skip
        for name, r in results.items():
            print(f"  {name:<34} warm x{r[n2]['warm'] / r[n1]['warm']:5.2f}  warm CPU x{r[n2]['cpu'] / r[n1]['cpu']:5.2f}"
                  f"  cold x{r[n2]['cold'] / r[n1]['cold']:5.2f}  peak RSS x{r[n2]['rss'] / r[n1]['rss']:5.2f}")
    print("\nthe index against the full scan it replaces (warm, same size):")
    for n in runs if "lineage <image id>" in results and "baseline: full scan by URL" in results else []:
        for what, idx, scan in (("image id", "lineage <image id>", "baseline: full scan by image id"),
                                ("URL", "lineage <dropped URL>", "baseline: full scan by URL")):  # fmt: skip
            print(f"  {n:>9,} rows, by {what:<9} x{results[scan][n]['warm'] / results[idx][n]['warm']:5.1f} faster")
    if not args.keep:
        for run, _ in runs.values():
            shutil.rmtree(run.parent)
    print(f"load at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
