"""A small run's ledger with what lineage look-ups must handle, written with the project's writers in row groups of 4
events (so that files have several): two ingest shards, a retry, ingest's cross-shard duplicates, a URL stored with
surrounding whitespace and the same URL repeated, one image downloaded by two rows, two image ids sharing a
6-digit prefix, seed images without rows, an nsfw file from before the ``attempt`` column existed, the whole-pool
ledgers of dedup and corpus in parts of ``PART_EVENTS`` events (several each), and retrieve's as one file, as
versions before parts wrote it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from infra import lineage
from infra.lineage import LedgerParts, LedgerWriter, ledger_dir
from infra.shards import ShardWriter
from infra.storage import sha256_bytes

N_ROWS = 30
PART_EVENTS = 6  # events per part of a whole-pool ledger: two row groups
WHITESPACE_URL = "  http://h1.example/img/7.png\n"  # row 7; row 8 lists the same URL without the spaces


def image_id(r: int) -> str:
    digest = hashlib.sha256(f"image {r}".encode()).hexdigest()
    return {11: "abcdef0" + digest[7:], 12: "abcdef1" + digest[7:]}.get(r, digest)  # 11 and 12 share "abcdef"


IDS = {r: image_id(r) for r in range(N_ROWS)}
IDS[10] = IDS[9]  # row 10 downloaded the same bytes as row 9
SEEDS = [hashlib.sha256(f"seed {i}".encode()).hexdigest() for i in range(2)]


def stored(image: str) -> bytes:
    """The bytes the corpus stores for an image (not an image: the audit only hashes them)."""
    return f"bytes of {image}".encode()


def url(r: int) -> str:
    return WHITESPACE_URL if r == 7 else WHITESPACE_URL.strip() if r == 8 else f"http://h{r % 3}.example/img/{r}.png"


def _ledger(stage: str, attempt: int = 0) -> LedgerWriter:
    return LedgerWriter(stage, attempt=attempt)


def build(run: Path, mp: pytest.MonkeyPatch) -> Path:
    """Write the ledger of ``run``; returns it. Rows: 0, 1 http_404; 3 url_malformed; 5 http_500, then downloaded
    by a retry; 8 url_duplicate of 7; 10 exact_duplicate of 9; 20 a perceptual duplicate of 2 across shards;
    13 a near duplicate of 14 (dedup); 16 dropped by nsfw; the rest kept, with two seed images, in one corpus
    shard."""
    mp.setattr(lineage, "ROW_GROUP_EVENTS", 4)
    stages = run / "stages"
    dropped = {0: "http_404", 1: "http_404", 3: "url_malformed", 5: "http_500", 8: "url_duplicate"}
    downloaded = [r for r in range(N_ROWS) if r not in dropped]
    for shard, rows in (("00000", range(15)), ("00001", range(15, N_ROWS))):
        w = _ledger("ingest")
        for r in rows:
            w.info("input", row_id=r, url="" if r == 3 else url(r), detail={"source": "list"})
        for r in rows:
            if r in dropped:
                w.drop(dropped[r], row_id=r, detail={"duplicate_of_row": 7} if r == 8 else None)
            elif r == 10:
                w.drop("exact_duplicate", row_id=r, image_id=IDS[r], detail={"duplicate_of": IDS[9]})
            else:
                w.info("downloaded", row_id=r, image_id=IDS[r])
        w.write(stages / "ingest" / "ledger" / f"{shard}.parquet")
    retry = _ledger("ingest", attempt=1)
    retry.info("retry", row_id=5, url=url(5))
    retry.info("downloaded", row_id=5, image_id=IDS[5])
    retry.write(stages / "ingest" / "ledger" / "r1-00000.parquet")
    cross = LedgerParts("ingest", ledger_dir(stages / "ingest"), name="_dedup", part_events=PART_EVENTS)
    cross.drop("phash_duplicate", row_id=20, image_id=IDS[20], detail={"duplicate_of": IDS[2], "duplicate_of_row": 2})
    cross.close()
    images = [r for r in [*downloaded, 5] if r not in (10, 20)]
    for shard, rows in (("00000", [r for r in images if r < 15]), ("00001", [r for r in images if r >= 15])):
        w = _ledger("nsfw")
        for r in rows:
            w.info("nsfw_score", row_id=r, image_id=IDS[r], detail={"score": 0.9 if r == 16 else 0.01})
            if r == 16:
                w.drop("nsfw", row_id=r, image_id=IDS[r])
        path = w.write(stages / "nsfw" / "ledger" / f"{shard}.parquet")
        if shard == "00001":  # written before the column existed
            pq.write_table(pq.read_table(path).drop_columns(["attempt"]), path, row_group_size=4)
    survivors = [r for r in images if r != 16]
    for shard, rows in (("00000", [r for r in survivors if r < 15]), ("00001", [r for r in survivors if r >= 15])):
        w = _ledger("faces")
        for r in rows:
            w.info("faces", row_id=r, image_id=IDS[r], detail={"n_faces": 0})
        w.write(stages / "faces" / "ledger" / f"{shard}.parquet")
    dd = LedgerParts("dedup", ledger_dir(stages / "dedup"), part_events=PART_EVENTS)
    for r in survivors:
        dd.info("dup_component", row_id=r, image_id=IDS[r], detail={"representative": IDS[14 if r == 13 else r]})
    dd.drop("near_duplicate", row_id=13, image_id=IDS[13], detail={"representative": IDS[14],
                                                                    "representative_row": 14})  # fmt: skip
    dd.close()
    rt = _ledger("retrieve")
    for r in survivors:
        if r != 13:
            rt.info("retrieved", row_id=r, image_id=IDS[r], detail={"query": SEEDS[r % 2]})
    rt.write(stages / "retrieve" / "ledger" / "retrieve.parquet")
    co = LedgerParts("corpus", ledger_dir(stages / "corpus"), part_events=PART_EVENTS)
    shard = ShardWriter(stages / "corpus" / "shards", "00000")
    for r, image, source in [*((r, IDS[r], "pool") for r in survivors if r != 13), *((None, s, "seeds") for s in SEEDS)]:
        co.keep("in_corpus", row_id=r, image_id=image, source=source,
                detail={"shard": "00000", "sha256": sha256_bytes(stored(image))})
        shard.add(image, stored(image), "png", row_id=r, source=source)
    co.close()
    shard.close()
    return run
