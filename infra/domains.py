"""Per-domain download statistics from the lineage ledger: which hosts served their images, which refused or failed
(and why), and how many of each host's images reached the corpus.

Read a batch of ledger files at a time: a row's host comes from the URL on its ``input`` event (or, for a retried
row, on its ``retry`` event), which is in the same ledger file as that attempt's outcome, so events are joined on
(file, row) and no file is joined with another. Memory holds one batch of files, the corpus's row ids and the
per-host counts, never the URL list. Hosts are extracted vectorised: each distinct ``scheme://host:port`` head once.

A row's download outcome is that of its latest attempt (see :mod:`infra.lineage`): ``downloaded`` when the bytes
arrived (an ``exact_duplicate`` of an image already fetched in that shard counts: the host served it), ``not
requested`` for rows never sent to the network (malformed list rows, repeated URLs), otherwise the drop reason
(``http_404``, ``timeout``, a URL-guard refusal, ...). Duplicates found across shards after the download
(``_dedup-*.parquet``: exact and perceptual) stay counted as downloaded.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from infra.lineage import LEDGER_SCHEMA, Ledger, latest_attempts, ledger_dir
from infra.lineage_index import ledger_listing
from infra.storage import atomic_path
from infra.urlnorm import UrlNormalizationError, parse_url

NOT_REQUESTED = frozenset({"list_row_malformed", "url_duplicate"})
FETCHED = frozenset({"downloaded", "exact_duplicate"})
NO_HOST = "(no host)"
LOCAL = "(local files)"  # file:// URLs of a local pool (ingest.local_roots)
COLUMNS = ["host", "urls", "requested", "downloaded", "download_rate", "in_corpus", "failures"]
CACHE_NAME = "domains.parquet"  # stages/ingest/<this>: the table of `domain_stats`, derived, never trusted (domains())
CACHE_FORMAT = "domains-2"  # 2: hosts normalised as the URL guard reads them (host_of)
DOMAIN_INPUTS = ("ingest", "corpus")  # the stages whose ledgers `domain_stats` reads
FILES_PER_BATCH = 256  # ledger files read together (ingest writes one per shard of `ingest.shard_size` rows)
# The head of a URL of the common form (scheme://netloc, the netloc in printable ASCII, followed by a path, query,
# fragment or nothing): urlsplit finds the same host in the head as in the whole URL. Other URLs go whole.
_HEAD = r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[\x21\x22\x24-\x2e\x30-\x3e\x40-\x7e]*)(?:[/?#]|$)"


def host_of(url: object, local: bool = False) -> str:
    """The URL's host name as the URL guard and a browser read it (WHATWG: lower case, IDNA to Punycode, an IPv4
    address in any notation as dotted decimal, ``0x7f.1`` and ``127.0.0.1`` alike), without port, credentials or
    IPv6 brackets; ``(no host)`` when it has none. A URL the normaliser refuses keeps ``urlsplit``'s reading of its
    host (such a row was dropped as ``url_malformed``, and its host still says where it pointed). ``local`` (the run
    has `ingest.local_roots`): file URLs are counted as ``(local files)``."""
    if not isinstance(url, str):
        return NO_HOST
    try:
        parsed = parse_url(url)
    except UrlNormalizationError:
        return _split_host(url, local)
    if local and parsed.scheme == "file":
        return LOCAL
    return (parsed.host or "").strip("[]") or (NO_HOST if parsed.special else _split_host(url, local))


def _split_host(url: str, local: bool) -> str:
    """``urlsplit``'s host, lower case: the reading of a URL the normaliser refuses or gives no host (not special)."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return NO_HOST
    if local and parts.scheme.lower() == "file":
        return LOCAL
    return host or NO_HOST


def _host_codes(urls: pa.Array | pa.ChunkedArray, local: bool) -> tuple[np.ndarray, list[str]]:
    """Every URL's host as a code into a list of names (:func:`host_of` of each distinct head, see ``_HEAD``)."""
    if isinstance(urls, pa.ChunkedArray):
        urls = urls.combine_chunks()
    match = pc.extract_regex(urls, _HEAD)
    encoded = pc.dictionary_encode(pc.if_else(match.is_valid(), pc.struct_field(match, "head"), urls))
    names = [host_of(k, local) for k in encoded.dictionary.to_pylist()] + [NO_HOST]
    return pc.fill_null(encoded.indices, len(names) - 1).to_numpy(), names


def hosts_of(urls: pa.Array | pa.ChunkedArray, local: bool = False) -> np.ndarray:
    """:func:`host_of` of every URL (an object array), computed once per distinct head (see ``_HEAD``)."""
    codes, names = _host_codes(urls, local)
    return np.array(names, dtype=object)[codes]


def _corpus_rows(ledger: Ledger) -> np.ndarray:
    keeps = ledger.query((ds.field("kind") == "keep") & ds.field("row_id").is_valid(), ["row_id"], stages=["corpus"])
    rows = np.sort(keeps["row_id"].to_numpy(np.int64))
    return rows[np.r_[True, rows[1:] != rows[:-1]]] if len(rows) else rows  # np.unique hashes: slower here


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, position) of ``keys`` in a sorted array."""
    pos = np.minimum(np.searchsorted(sorted_keys, keys), max(len(sorted_keys) - 1, 0))
    return (sorted_keys[pos] == keys) if len(sorted_keys) else np.zeros(len(keys), bool), pos


def _numpy(column: pa.ChunkedArray, fill: object) -> np.ndarray:
    return pc.fill_null(column, fill).to_numpy(zero_copy_only=False)


class _Counts:
    """Rows counted by (host, key): key ``urls``, ``in_corpus`` or the outcome reason; a batch of ledger files at a
    time, with numpy (events are joined on (file, row): a row's host comes from its own file)."""

    def __init__(self, latest: pd.Series, corpus: np.ndarray, local: bool):
        self.latest_rows, self.latest = latest.index.to_numpy(np.int64), latest.to_numpy(np.int64)
        self.corpus, self.local = corpus, local
        self.totals: dict[str, Counter] = {}

    def add(self, table: pa.Table, file_no: np.ndarray) -> None:
        reason = table["reason"].unify_dictionaries().combine_chunks()  # read as a dictionary (_FORMAT)
        names = reason.dictionary.to_pylist()
        code = _numpy(reason.indices, -1)
        row = _numpy(table["row_id"], -1)
        key = file_no.astype(np.int64) << 40 | row
        named = np.isin(code, [names.index(n) for n in ("input", "retry") if n in names])
        host_code, host_names = _host_codes(table["url"].filter(pa.array(named)), self.local)
        first_keys, first = np.unique(key[named], return_index=True)  # a row named twice in a file: its first event
        first_host = host_code[first]
        inputs = code == (names.index("input") if "input" in names else -2)
        found, at = _lookup(self.latest_rows, row)
        current = np.where(found, self.latest[at] if len(self.latest) else 0, 0)
        outcome = (_numpy(pc.equal(table["kind"], "drop"), False) | (code == (names.index("downloaded")
                   if "downloaded" in names else -2))) & (_numpy(table["attempt"], 0) == current)  # fmt: skip
        keys = [*names, "urls", "in_corpus"]
        for mask, key_code in ((inputs, len(names)), (inputs & np.isin(row, self.corpus), len(names) + 1),
                               (outcome, None)):  # fmt: skip
            # A row not named in its file: a decision after its download was counted (the cross-shard duplicates of
            # ingest's `_dedup-*.parquet`), not a download outcome: left out.
            hit, pos = _lookup(first_keys, key[mask])
            kc = code[mask][hit] if key_code is None else np.full(int(hit.sum()), key_code)
            pairs, n = np.unique(first_host[pos[hit]].astype(np.int64) * len(keys) + kc, return_counts=True)
            for pair, count in zip(pairs.tolist(), n.tolist(), strict=True):
                self.totals.setdefault(host_names[pair // len(keys)], Counter())[keys[pair % len(keys)]] += count


# kind and reason read as dictionaries, as they are stored: no string per event is built
_FORMAT = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=["kind", "reason"]))
_READ_SCHEMA = pa.schema([f.with_type(pa.dictionary(pa.int32(), pa.string())) if f.name in ("kind", "reason") else f
                          for f in LEDGER_SCHEMA])  # fmt: skip


def _batches(files: list[Path]) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """The ingest ledger's events, a batch of files at a time, with each event's file (a number)."""
    columns = ["row_id", "kind", "reason", "url", "attempt"]
    for i in range(0, len(files), FILES_PER_BATCH):
        batch = [str(f) for f in files[i:i + FILES_PER_BATCH]]
        number = {f: n for n, f in enumerate(batch)}
        scan = ds.dataset(batch, schema=_READ_SCHEMA, format=_FORMAT).scanner(columns=columns).scan_batches()
        tables = [(number[t.fragment.path], t.record_batch) for t in scan]
        if tables:
            file_no = np.concatenate([np.full(b.num_rows, n, np.int32) for n, b in tables])
            yield pa.Table.from_batches([b for _, b in tables]), file_no


def domain_stats(run_dir: Path, local: bool = False) -> pd.DataFrame:
    """One row per host (most URLs first): ``urls`` in the list, ``requested`` from the network, ``downloaded``,
    ``download_rate`` (downloaded / requested), ``in_corpus``, and ``failures`` ({reason: rows}, largest first).
    ``local``: the run has `ingest.local_roots` (its file URLs are counted as ``(local files)``). Empty when ingest
    wrote no ledger."""
    ledger = Ledger(run_dir)
    latest, corpus = latest_attempts(ledger), _corpus_rows(ledger)  # the retried rows; the corpus's row ids
    files = sorted(ledger_dir(Path(run_dir) / "stages" / "ingest").glob("*.parquet"))
    counts = _Counts(latest, corpus, local)
    for table, file_no in _batches(files):
        counts.add(table, file_no)
    out = []
    for h, c in counts.totals.items():
        requested = c["urls"] - sum(c[k] for k in NOT_REQUESTED)
        downloaded = sum(c[k] for k in FETCHED)
        failures = {k: n for k, n in c.items() if k not in FETCHED | NOT_REQUESTED | {"urls", "in_corpus"}}
        out.append({"host": h, "urls": c["urls"], "requested": requested, "downloaded": downloaded,
                    "download_rate": downloaded / requested if requested else float("nan"), "in_corpus": c["in_corpus"],
                    "failures": dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0])))})  # fmt: skip
    frame = pd.DataFrame(out, columns=COLUMNS)
    return frame.sort_values(["urls", "host"], ascending=[False, True], ignore_index=True)


def domains(run_dir: Path, local: bool = False) -> pd.DataFrame:
    """:func:`domain_stats`, read from ``stages/ingest/domains.parquet`` when that was computed from the ledger files
    as they are now (its key: name, size and mtime of every ingest and corpus ledger file, and ``local``), else
    computed and stored there for the next call. The ingest and corpus stages' completion computes it, so `lvd
    domains` on a finished run reads a table of one row per host instead of every ingest event. Derived data: an
    unreadable or stale table is recomputed; one that cannot be written is not kept."""
    path, key = Path(run_dir) / "stages" / "ingest" / CACHE_NAME, _ledger_state(run_dir, local)
    frame = _read_cache(path, key)
    if frame is None:
        frame = domain_stats(run_dir, local)
        if not frame.empty:
            _write_cache(path, frame, key)
    return frame


def _ledger_state(run_dir: Path, local: bool) -> str:
    """A digest of what `domain_stats` reads: each ingest and corpus ledger file's name, size and mtime."""
    h = hashlib.sha256(f"{CACHE_FORMAT}:{int(local)}".encode())
    for stage in DOMAIN_INPUTS:
        folder = ledger_dir(Path(run_dir) / "stages" / stage)
        listing = ledger_listing(folder) if folder.is_dir() else {}
        files = sorted((name, st.st_size, st.st_mtime_ns) for name, st in listing.items())
        h.update(json.dumps([stage, files]).encode())
    return h.hexdigest()


def _read_cache(path: Path, key: str) -> pd.DataFrame | None:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    if (table.schema.metadata or {}).get(b"lvd_key") != key.encode():
        return None
    frame = table.to_pandas()
    frame["failures"] = [json.loads(f) for f in frame["failures"]]
    return frame[COLUMNS]


def _write_cache(path: Path, frame: pd.DataFrame, key: str) -> None:
    table = pa.Table.from_pandas(frame.assign(failures=[json.dumps(f) for f in frame["failures"]]), preserve_index=False)
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table.replace_schema_metadata({"lvd_key": key}), tmp)
    except OSError:  # a read-only run (shared, archived): the table is computed at every call
        pass


def format_domains(frame: pd.DataFrame, top: int | None = 30) -> str:
    """A plain-text table of the ``top`` hosts with the most URLs, and a line for the rest."""
    shown = frame if top is None else frame.head(top)
    lines = [f"{'host':<40} {'urls':>9} {'downloaded':>10} {'rate':>6} {'corpus':>7}  failures"]
    for r in shown.itertuples(index=False):
        rate = "-" if r.requested == 0 else f"{100 * r.download_rate:.0f}%"
        failures = ", ".join(f"{k} {v:,}" for k, v in list(r.failures.items())[:3])
        failures += ", ..." if len(r.failures) > 3 else ""
        lines.append(f"{r.host[:40]:<40} {r.urls:>9,} {r.downloaded:>10,} {rate:>6} {r.in_corpus:>7,}  {failures}")
    rest = frame.iloc[len(shown):]
    if len(rest):
        lines.append(f"... {len(rest):,} more hosts with {int(rest['urls'].sum()):,} URLs")
    req, got = int(frame["requested"].sum()), int(frame["downloaded"].sum())
    rate = f" ({100 * got / req:.1f}%)" if req else ""
    lines.append(f"{len(frame):,} hosts, {int(frame['urls'].sum()):,} URLs, {got:,} of {req:,} requested downloaded"
                 f"{rate}, {int(frame['in_corpus'].sum()):,} in the corpus")
    return "\n".join(lines)
