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
(``_dedup.parquet``: exact and perceptual) stay counted as downloaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from infra.lineage import LEDGER_SCHEMA, Ledger, latest_attempts, ledger_dir

NOT_REQUESTED = frozenset({"list_row_malformed", "url_duplicate"})
FETCHED = frozenset({"downloaded", "exact_duplicate"})
NO_HOST = "(no host)"
LOCAL = "(local files)"  # file:// URLs of a local pool (ingest.local_roots)
COLUMNS = ["host", "urls", "requested", "downloaded", "download_rate", "in_corpus", "failures"]
FILES_PER_BATCH = 256  # ledger files read together (ingest writes one per shard of `ingest.shard_size` rows)
# The head of a URL of the common form (scheme://netloc, the netloc in printable ASCII, followed by a path, query,
# fragment or nothing): urlsplit finds the same host in the head as in the whole URL. Other URLs go whole.
_HEAD = r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[\x21\x22\x24-\x2e\x30-\x3e\x40-\x7e]*)(?:[/?#]|$)"


def host_of(url: object, local: bool = False) -> str:
    """The URL's host name, lower case, without port or credentials; ``(no host)`` when it has none or is invalid.
    ``local`` (the run has `ingest.local_roots`): file URLs are counted as ``(local files)``."""
    if not isinstance(url, str):
        return NO_HOST
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return NO_HOST
    if local and parts.scheme.lower() == "file":
        return LOCAL
    return host or NO_HOST


def hosts_of(urls: pa.Array | pa.ChunkedArray, local: bool = False) -> np.ndarray:
    """:func:`host_of` of every URL (an object array), computed once per distinct head (see ``_HEAD``)."""
    if isinstance(urls, pa.ChunkedArray):
        urls = urls.combine_chunks()
    match = pc.extract_regex(urls, _HEAD)
    encoded = pc.dictionary_encode(pc.if_else(match.is_valid(), pc.struct_field(match, "head"), urls))
    hosts = np.array([host_of(k, local) for k in encoded.dictionary.to_pylist()] + [NO_HOST], dtype=object)
    return hosts[pc.fill_null(encoded.indices, len(encoded.dictionary)).to_numpy()]


def _corpus_rows(ledger: Ledger) -> np.ndarray:
    keeps = ledger.query((ds.field("kind") == "keep") & ds.field("row_id").is_valid(), ["row_id"], stages=["corpus"])
    return np.unique(keeps["row_id"].to_numpy(np.int64))


def _batch_counts(ev: pd.DataFrame, latest: pd.Series, corpus: np.ndarray) -> pd.Series:
    """A batch of ledger files' rows (column ``file``: which file) counted by (host, key): key ``urls``,
    ``in_corpus`` or the outcome reason."""
    named = ev.loc[ev["reason"].isin(("input", "retry")), ["file", "row_id", "host"]].drop_duplicates(["file", "row_id"])
    inputs = ev.loc[ev["reason"] == "input", ["file", "row_id"]]
    current = ev["row_id"].map(latest).fillna(0).astype("int64")
    outcome = ev[((ev["kind"] == "drop") | (ev["reason"] == "downloaded")) & (ev["attempt"].fillna(0) == current)]
    parts = [inputs.assign(key="urls"), inputs[np.isin(inputs["row_id"], corpus)].assign(key="in_corpus"),
             outcome[["file", "row_id", "reason"]].rename(columns={"reason": "key"})]  # fmt: skip
    # A row not named in its file: a decision after its download was counted (the cross-shard exact and perceptual
    # duplicates of ingest's `_dedup.parquet`), not a download outcome; the inner join leaves it out.
    keyed = pd.concat(parts).merge(named, on=["file", "row_id"], how="inner")
    return keyed.groupby(["host", "key"]).size()


def _batches(files: list[Path], local: bool) -> Iterator[pd.DataFrame]:
    """The ingest ledger's events, a batch of files at a time, with each event's file and its URL's host."""
    columns = ["row_id", "kind", "reason", "url", "attempt"]
    for i in range(0, len(files), FILES_PER_BATCH):
        batch = [str(f) for f in files[i:i + FILES_PER_BATCH]]
        number = {f: n for n, f in enumerate(batch)}
        tables = [(number[t.fragment.path], t.record_batch)
                  for t in ds.dataset(batch, schema=LEDGER_SCHEMA, format="parquet").scanner(columns=columns).scan_batches()]  # fmt: skip
        if not tables:
            continue
        table = pa.Table.from_batches([b for _, b in tables])
        file_no = np.concatenate([np.full(b.num_rows, n, np.int32) for n, b in tables])
        yield table.to_pandas().assign(file=file_no, host=hosts_of(table["url"], local))


def domain_stats(run_dir: Path, local: bool = False) -> pd.DataFrame:
    """One row per host (most URLs first): ``urls`` in the list, ``requested`` from the network, ``downloaded``,
    ``download_rate`` (downloaded / requested), ``in_corpus``, and ``failures`` ({reason: rows}, largest first).
    ``local``: the run has `ingest.local_roots` (its file URLs are counted as ``(local files)``). Empty when ingest
    wrote no ledger."""
    ledger = Ledger(run_dir)
    latest, corpus = latest_attempts(ledger), _corpus_rows(ledger)  # the retried rows; the corpus's row ids
    files = sorted(ledger_dir(Path(run_dir) / "stages" / "ingest").glob("*.parquet"))
    totals: dict[str, Counter] = {}
    for ev in _batches(files, local):
        for (h, key), n in _batch_counts(ev, latest, corpus).items():
            totals.setdefault(h, Counter())[key] += int(n)
    out = []
    for h, c in totals.items():
        requested = c["urls"] - sum(c[k] for k in NOT_REQUESTED)
        downloaded = sum(c[k] for k in FETCHED)
        failures = {k: n for k, n in c.items() if k not in FETCHED | NOT_REQUESTED | {"urls", "in_corpus"}}
        out.append({"host": h, "urls": c["urls"], "requested": requested, "downloaded": downloaded,
                    "download_rate": downloaded / requested if requested else float("nan"), "in_corpus": c["in_corpus"],
                    "failures": dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0])))})  # fmt: skip
    frame = pd.DataFrame(out, columns=COLUMNS)
    return frame.sort_values(["urls", "host"], ascending=[False, True], ignore_index=True)


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
