"""The lineage ledger: the one record of every decision about every input row and image.

Each stage writes ``stages/<stage>/ledger/<shard>.parquet`` with the schema below; a stage that decides over the
whole pool (dedup, retrieve, rebalance, corpus, ingest's cross-shard duplicates) writes ``<name>-00000.parquet``, ...
in parts of at most ``PART_EVENTS`` events (:class:`LedgerParts`), so that neither its writer's memory nor the
footer a look-up opens grows with the pool (runs of earlier versions have one ``<stage>.parquet``: read alike).
An event is about an input row (``row_id``: its position in the URL list, stable across reruns), an image
(``image_id``: sha256 of the bytes that were downloaded, stable from ingestion to corpus), or both. ``kind`` is

- ``drop``: terminal; the row/image leaves the pipeline at this stage for ``reason``;
- ``keep``: terminal; the image is in the corpus (written by the corpus stage only);
- ``info``: a decision or measurement on the way (NSFW score, faces blurred, duplicate component, ...).

Invariant (checked by :func:`check_terminal_outcomes`): every input row has exactly one terminal event.

Retries (``lvd retry-failed``): ingest events carry an ``attempt`` (0 for the first download; null in files
written before the column existed reads as 0). A retry writes its own events for the retried rows with attempt
n > 0 (``info retry``, then ``info downloaded`` or a new ``drop``) and never rewrites older files. Only the
ingest events of a row's latest attempt count as its ingest outcome: an ingest ``drop`` of an earlier attempt is
*superseded* (kept as history, shown by ``chain``, ignored by the invariant). Terminal events of later stages are
always current, because a retry changes the ingest manifest and so invalidates every later stage.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from infra.storage import atomic_path

if TYPE_CHECKING:  # imported where used: `lvd lineage` and the stages import this module, and pandas with
    import pandas as pd  # pyarrow.dataset (which imports it) cost ~0.5 s of start-up that a look-up does not need
    import pyarrow.dataset as ds

LEDGER_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("stage", pa.string()),
        ("kind", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("url", pa.string()),
        ("attempt", pa.int32()),
    ]
)
ROW_GROUP_EVENTS = 8192  # small row groups: a look-up through the index (infra.lineage_index) reads one of them
PART_EVENTS = 8 * ROW_GROUP_EVENTS  # events per part of a whole-pool ledger (LedgerParts): 45 MiB of dedup's held
KINDS = ("drop", "keep", "info")
TERMINAL = ("drop", "keep")
POOL = "pool"  # source name of images that came from the URL list


@dataclass
class LedgerWriter:
    """Collects one shard's events of one stage and writes them atomically as one parquet file."""

    stage: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    attempt: int = 0  # ingest retries: see the module docstring

    def add(
        self,
        kind: str,
        reason: str,
        *,
        row_id: int | None = None,
        image_id: str | None = None,
        source: str = POOL,
        detail: Mapping[str, Any] | None = None,
        url: str | None = None,
        attempt: int | None = None,
    ) -> None:
        assert kind in KINDS, kind
        assert row_id is not None or image_id is not None, "an event needs a row_id or an image_id"
        self.rows.append(
            {
                "row_id": None if row_id is None else int(row_id),
                "image_id": image_id,
                "source": source,
                "stage": self.stage,
                "kind": kind,
                "reason": reason,
                "detail": json.dumps(detail, sort_keys=True, default=_json_default) if detail else None,
                "url": url,
                "attempt": self.attempt if attempt is None else int(attempt),
            }
        )

    def drop(self, reason: str, **kw: Any) -> None:
        self.add("drop", reason, **kw)

    def info(self, reason: str, **kw: Any) -> None:
        self.add("info", reason, **kw)

    def keep(self, reason: str, **kw: Any) -> None:
        self.add("keep", reason, **kw)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {k: {} for k in KINDS}
        for r in self.rows:
            out[r["kind"]][r["reason"]] = out[r["kind"]].get(r["reason"], 0) + 1
        return out

    def write(self, path: Path) -> Path:
        return write_ledger(pa.Table.from_pylist(self.rows, schema=LEDGER_SCHEMA), path)


class LedgerParts(LedgerWriter):
    """The ledger of a stage that decides over the whole pool, written while it is added: parts
    ``<folder>/<name>-00000.parquet``, ... of ``part_events`` events each (default ``PART_EVENTS``), each written
    atomically when it fills, so the writer holds one part whatever the pool's size. Creating one removes what an
    earlier attempt left under that name (its parts, or the single ``<name>.parquet`` of earlier versions);
    :meth:`close` writes the last part (an empty one for a stage without events) and returns every part written."""

    def __init__(self, stage: str, folder: Path, *, name: str | None = None, part_events: int | None = None):
        super().__init__(stage)
        self.folder, self.name = Path(folder), name or stage
        self.part_events = part_events or PART_EVENTS
        self.paths: list[Path] = []
        self._held: list[pa.Table] = []  # events added but not written, less those still in ``rows``
        self._tally: dict[str, dict[str, int]] = {k: {} for k in KINDS}
        if self.folder.is_dir():
            for f in os.scandir(self.folder):
                if is_part_of(self.name, f.name):
                    os.unlink(f.path)

    def add(self, kind: str, reason: str, **kw: Any) -> None:
        super().add(kind, reason, **kw)
        self._count([kind], [reason])
        if len(self.rows) + sum(len(t) for t in self._held) >= self.part_events:
            self._flush()

    def extend(self, table: pa.Table) -> None:
        """Events given as a table with ``LEDGER_SCHEMA``'s columns (their ``stage`` kept as it is)."""
        self._hold_rows()
        self._held.append(table.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA))
        self._count(table["kind"].to_pylist(), table["reason"].to_pylist())
        self._flush()

    def counts(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self._tally.items()}

    def write(self, path: Path) -> Path:
        raise TypeError("a ledger in parts is written as it fills: call close()")

    def close(self) -> list[Path]:
        self._flush(final=True)
        return list(self.paths)

    def _count(self, kinds: list[str], reasons: list[str]) -> None:
        for kind, reason in zip(kinds, reasons, strict=True):
            self._tally[kind][reason] = self._tally[kind].get(reason, 0) + 1

    def _hold_rows(self) -> None:
        if self.rows:
            self._held.append(pa.Table.from_pylist(self.rows, schema=LEDGER_SCHEMA))
            self.rows = []

    def _flush(self, final: bool = False) -> None:
        """Write every full part held (and on ``final`` the rest, or an empty part if none was written)."""
        self._hold_rows()
        held = pa.concat_tables(self._held) if self._held else LEDGER_SCHEMA.empty_table()
        while len(held) >= self.part_events or (final and (len(held) or not self.paths)):
            part = held.slice(0, self.part_events)
            self.paths.append(write_ledger(part, self.folder / part_name(self.name, len(self.paths))))
            held = held.slice(len(part))
        self._held = [held] if len(held) else []


def part_name(name: str, index: int) -> str:
    return f"{name}-{index:05d}.parquet"


def is_part_of(name: str, file: str) -> bool:
    """Whether ``file`` is a part of the ledger ``name`` (or its single file from before parts)."""
    return re.fullmatch(rf"{re.escape(name)}(-\d+)?\.parquet", file) is not None


def write_ledger(table: pa.Table, path: Path) -> Path:
    """Write events (``LEDGER_SCHEMA``) atomically as one ledger file, in row groups of ``ROW_GROUP_EVENTS``."""
    with atomic_path(path) as tmp:
        pq.write_table(table.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA), tmp, row_group_size=ROW_GROUP_EVENTS)
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def url_key(text: str) -> str:
    """What a URL is looked up by, in the index and in a full scan alike: the URL as ingestion normalises it
    (infra.urlnorm: whitespace stripped, WHATWG percent-encoding, IDNA hosts), so that a list entry is found as the
    run stored it, as the user types it, or as it was fetched. A URL that cannot be normalised (ingestion recorded it
    as `url_malformed`) is looked up as written, without surrounding whitespace."""
    from infra.urlnorm import normalize_url

    try:
        return normalize_url(text.strip())
    except ValueError:
        return text.strip()


def _field(name: str) -> ds.Expression:
    import pyarrow.dataset as ds

    return ds.field(name)


def ledger_dir(stage_dir: Path) -> Path:
    return Path(stage_dir) / "ledger"


def ledger_files(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("stages/*/ledger/*.parquet"))


def _is_ledger_file(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith(".")  # what the glob above matches


class Ledger:
    """Read side of the ledger of a run: streamed through pyarrow datasets, filtered at the source."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def dataset(self, stages: Iterable[str] | None = None) -> ds.Dataset | None:
        if stages is None:
            files = [str(p) for p in ledger_files(self.run_dir)]
        else:  # only these stages' folders are listed, and their files opened
            files = sorted(f.path for s in stages if ledger_dir(self.run_dir / "stages" / s).is_dir()
                           for f in os.scandir(ledger_dir(self.run_dir / "stages" / s)) if _is_ledger_file(f.name))
        import pyarrow.dataset as ds

        return ds.dataset(files, schema=LEDGER_SCHEMA, format="parquet") if files else None

    def query(self, expr: ds.Expression | None = None, columns: list[str] | None = None,
              stages: Iterable[str] | None = None) -> pd.DataFrame:
        import pandas as pd

        data = self.dataset(stages)
        if data is None:
            return pd.DataFrame(columns=columns or LEDGER_SCHEMA.names)
        return data.to_table(filter=expr, columns=columns).to_pandas()

    def events(self) -> pd.DataFrame:
        return self.query()

    def rows_for_url(self, url: str) -> list[int]:
        hits = self.query((_field("reason") == "input") & _field("url").is_valid(), ["row_id", "url"])
        hits = hits[hits["url"].map(url_key) == url_key(url)]
        return sorted(int(r) for r in hits["row_id"].dropna())

    def image_ids_for_rows(self, row_ids: Iterable[int]) -> list[str]:
        rows = [int(r) for r in row_ids]
        if not rows:
            return []
        hits = self.query(_field("row_id").isin(rows) & _field("image_id").is_valid(), ["image_id"])
        return sorted(set(hits["image_id"]))

    def chain(self, *, image_id: str | None = None, url: str | None = None, row_id: int | None = None) -> pd.DataFrame:
        """Every event about an image (and its input rows), about a URL or an input row (the rows and their images).

        A full scan of the ledger: the reference that the index's look-ups (infra.lineage_index) agree with."""
        import pandas as pd

        rows: list[int] = []
        images: list[str] = []
        if url is not None or row_id is not None:
            rows = self.rows_for_url(url) if url is not None else [int(row_id)]
            images = self.image_ids_for_rows(rows)
        if image_id is not None:
            images = [image_id]
            hits = self.query(_field("image_id") == image_id, ["row_id"])
            rows = sorted({int(r) for r in hits["row_id"].dropna()})
        expr = None
        if rows:
            expr = _field("row_id").isin(rows)
        if images:
            by_image = _field("image_id").isin(images)
            expr = by_image if expr is None else (expr | by_image)
        if expr is None:
            return pd.DataFrame(columns=LEDGER_SCHEMA.names)
        return order_events(self.query(expr))

    def terminal_outcomes(self) -> pd.DataFrame:
        """One row per terminal event (drop or keep)."""
        return self.query(_field("kind").isin(list(TERMINAL)))


STAGE_ORDER = {
    name: i
    for i, name in enumerate(
        ["crawl", "ingest", "nsfw", "faces", "dedup", "embed", "retrieve", "rebalance", "corpus", "pretrain",
         "pretrain_highres", "distill", "evaluate"]
    )
}


def event_order(event: Mapping[str, Any]) -> tuple[int, int, int]:
    """The order of :func:`order_events` for one event (a dict): stage in pipeline order, attempt, outcomes last."""
    return STAGE_ORDER.get(event["stage"], 99), event.get("attempt") or 0, int(event["kind"] != "info")


def order_events(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    attempt = df["attempt"].fillna(0) if "attempt" in df.columns else 0
    df = df.assign(_o=df["stage"].map(STAGE_ORDER).fillna(99), _a=attempt, _k=(df["kind"] != "info").astype(int))
    return df.sort_values(["_o", "_a", "_k"], kind="stable").drop(columns=["_o", "_a", "_k"]).reset_index(drop=True)


@dataclass
class OutcomeCheck:
    n_rows: int
    n_kept: int
    dropped: dict[str, int]
    missing: list[int]
    multiple: list[int]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.multiple and self.n_kept + sum(self.dropped.values()) == self.n_rows


def latest_attempts(ledger: Ledger) -> pd.Series:
    """Row id -> its latest ingest attempt, for the rows that were retried (every other row's is 0)."""
    # A retry's events all have attempt >= 1: the filter on it lets row-group statistics skip every first-attempt
    # shard without reading it (written before the column existed: null, and no retries then).
    retries = ledger.query((_field("attempt") > 0) & (_field("stage") == "ingest") & (_field("reason") == "retry"),
                           ["row_id", "attempt"], stages=["ingest"])
    return retries.groupby("row_id")["attempt"].max()


def superseded(events: pd.DataFrame, ledger: Ledger) -> pd.Series:
    """True for the ingest events of ``events`` that belong to an attempt older than their row's latest one."""
    import pandas as pd

    attempt = events["attempt"].fillna(0).astype("int64")
    is_ingest = (events["stage"] == "ingest") & events["row_id"].notna()
    latest = latest_attempts(ledger)
    if latest.empty:
        return pd.Series(False, index=events.index)
    row_latest = events["row_id"].map(latest).fillna(0).astype("int64")
    return is_ingest & (attempt < row_latest)


def check_terminal_outcomes(ledger: Ledger) -> OutcomeCheck:
    """Every input row (an ``input`` event of ingest) has exactly one terminal event (superseded ones aside)."""
    inputs = ledger.query((_field("stage") == "ingest") & (_field("reason") == "input"), ["row_id"])
    terminal = ledger.query(
        _field("kind").isin(list(TERMINAL)) & _field("row_id").is_valid(),
        ["row_id", "kind", "stage", "reason", "attempt"],
    )
    terminal = terminal[~superseded(terminal, ledger)]
    all_rows = set(int(r) for r in inputs["row_id"])
    counts = terminal.groupby("row_id").size()
    multiple = sorted(int(r) for r, n in counts.items() if n > 1)
    missing = sorted(all_rows - {int(r) for r in counts.index})
    drops = terminal[terminal["kind"] == "drop"]
    dropped = {f"{s}:{r}": int(n) for (s, r), n in drops.groupby(["stage", "reason"]).size().items()}
    n_kept = int((terminal["kind"] == "keep").sum())
    return OutcomeCheck(len(all_rows), n_kept, dropped, missing, multiple)
