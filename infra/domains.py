"""Per-domain download statistics from the lineage ledger: which hosts served their images, which refused or failed
(and why), and how many of each host's images reached the corpus.

Read shard by shard: a row's host comes from the URL on its ``input`` event (or, for a retried row, on its ``retry``
event), which is in the same ledger file as that attempt's outcome, so no file is joined with another. Memory holds
one ledger file, the corpus's row ids and the per-host counts, never the URL list.

A row's download outcome is that of its latest attempt (see :mod:`infra.lineage`): ``downloaded`` when the bytes
arrived (an ``exact_duplicate`` of an image already fetched in that shard counts: the host served it), ``not
requested`` for rows never sent to the network (malformed list rows, repeated URLs), otherwise the drop reason
(``http_404``, ``timeout``, a URL-guard refusal, ...). Duplicates found across shards after the download
(``_dedup.parquet``: exact and perceptual) stay counted as downloaded.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from infra.lineage import Ledger, latest_attempts, ledger_dir

NOT_REQUESTED = frozenset({"list_row_malformed", "url_duplicate"})
FETCHED = frozenset({"downloaded", "exact_duplicate"})
NO_HOST = "(no host)"
LOCAL = "(local files)"  # file:// URLs of a local pool (ingest.local_roots)
COLUMNS = ["host", "urls", "requested", "downloaded", "download_rate", "in_corpus", "failures"]


def host_of(url: object) -> str:
    """The URL's host name, lower case, without port or credentials; ``(local files)`` for file URLs; ``(no host)``
    when it has none or is invalid."""
    if not isinstance(url, str):
        return NO_HOST
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return NO_HOST
    if parts.scheme.lower() == "file":
        return LOCAL
    return host or NO_HOST


def _corpus_rows(ledger: Ledger) -> np.ndarray:
    keeps = ledger.query((ds.field("stage") == "corpus") & (ds.field("kind") == "keep") & ds.field("row_id").is_valid(),
                         ["row_id"])  # fmt: skip
    return np.unique(keeps["row_id"].to_numpy(np.int64))


def _file_counts(ev: pd.DataFrame, latest: pd.Series, corpus: np.ndarray) -> pd.Series:
    """One ledger file's rows counted by (host, key): key ``urls``, ``in_corpus`` or the outcome reason."""
    named = ev[ev["reason"].isin(("input", "retry"))]
    host = pd.Series(named["url"].map(host_of).to_numpy(), index=named["row_id"].to_numpy())
    host = host[~host.index.duplicated()]
    inputs = ev.loc[ev["reason"] == "input", "row_id"]
    current = ev["row_id"].map(latest).fillna(0).astype("int64")
    outcome = ev[((ev["kind"] == "drop") | (ev["reason"] == "downloaded")) & (ev["attempt"].fillna(0) == current)]
    parts = [(inputs, "urls"), (inputs[np.isin(inputs, corpus)], "in_corpus"), (outcome["row_id"], outcome["reason"])]
    keyed = pd.concat(pd.DataFrame({"host": host.reindex(rows.to_numpy()).to_numpy(),
                                    "key": key if isinstance(key, str) else key.to_numpy()})
                      for rows, key in parts)  # fmt: skip
    # A row not named in this file: a decision after its download was counted (the cross-shard exact and perceptual
    # duplicates of ingest's `_dedup.parquet`), not a download outcome.
    return keyed.dropna(subset=["host"]).groupby(["host", "key"]).size()


def domain_stats(run_dir: Path) -> pd.DataFrame:
    """One row per host (most URLs first): ``urls`` in the list, ``requested`` from the network, ``downloaded``,
    ``download_rate`` (downloaded / requested), ``in_corpus``, and ``failures`` ({reason: rows}, largest first).
    Empty when ingest wrote no ledger."""
    ledger = Ledger(run_dir)
    latest, corpus = latest_attempts(ledger), _corpus_rows(ledger)  # the retried rows; the corpus's row ids
    files = sorted(ledger_dir(Path(run_dir) / "stages" / "ingest").glob("*.parquet"))
    totals: dict[str, Counter] = {}
    for f in files:
        ev = pq.read_table(f, columns=["row_id", "kind", "reason", "url", "attempt"]).to_pandas()
        for (h, key), n in _file_counts(ev, latest, corpus).items():
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
