"""Dedup at ingestion: identical bytes at other URLs (in the same shard and in another) and a resized JPEG copy
with the same perceptual hash, across shards; the ``exact_dedup`` / ``phash_dedup`` switches and the Hamming
threshold ``phash_max_distance``.

One ingest run over a loopback server is shared by the module; the switch variants rerun the cross-shard step
(:func:`curation.ingest.finish`) on copies of its stage directory.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curation.faces import blur_faces
from curation.ingest import DUPLICATES, excluded, finish, ingest
from curation.phash import distance, near_duplicates, phash, to_hex
from infra.config.data import DataConfig
from infra.config.ingest import FacesConfig, IngestConfig
from infra.demo.server import DemoServer, free_port
from infra.lineage import Ledger
from infra.shards import list_shards
from infra.stage import ShardTracker
from infra.storage import sha256_bytes
from tests.curation.conftest import blob_image, jpeg, png

CFG = dict(shard_size=3, threads=4, timeout=2, allow_hosts=["127.0.0.1"], encode_format="png", encode_quality=1)
A, B, C = blob_image(0, 48), blob_image(1, 48), blob_image(9, 48)
FILES = {
    "a.png": png(A),
    "b.png": png(B),
    "c.png": png(C),
    "b_resized.jpg": jpeg(B.resize((72, 72), Image.BICUBIC), quality=80),  # other bytes, same phash as b.png
    "c_rotated.png": png(C.rotate(3, Image.BICUBIC)),  # 2 bits from c.png's phash
}
# row: file served at /img/<name>; shards of 3 rows: 00000 = rows 0-2, 00001 = rows 3-5, 00002 = row 6
ROWS = ["a.png", "b.png", "a_copy.png", "a_again.png", "b_resized.jpg", "c.png", "c_rotated.png"]
SHA = {name: sha256_bytes(FILES[name.replace("_copy", "").replace("_again", "")]) for name in ROWS}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    (root / "images").mkdir()
    for name in ROWS:
        (root / "images" / name).write_bytes(FILES[name.replace("_copy", "").replace("_again", "")])
    port = free_port()
    pd.DataFrame({"url": [f"http://127.0.0.1:{port}/img/{n}" for n in ROWS]}).to_parquet(root / "urls.parquet")
    stage = root / "run" / "stages" / "ingest"
    with DemoServer(root / "images", port):
        tracker = ShardTracker("ingest", stage)
        result = ingest(DataConfig(url_list=root / "urls.parquet"), stage, IngestConfig(**CFG), tracker)
    return root, stage, result


def _hash(name: str) -> int:
    return phash(Image.open(io.BytesIO(FILES[name])))


def test_the_planted_copies_hash_as_intended():
    assert distance(_hash("b.png"), _hash("b_resized.jpg")) == 0 and SHA["b.png"] != SHA["b_resized.jpg"]
    assert distance(_hash("c.png"), _hash("c_rotated.png")) == 2
    others = [distance(_hash(x), _hash(y)) for x, y in (("a.png", "b.png"), ("a.png", "c.png"), ("b.png", "c.png"),
                                                          ("a.png", "c_rotated.png"), ("b.png", "c_rotated.png"))]
    assert min(others) > 8  # fmt: skip


def _ingest_drops(run_dir):
    ev = Ledger(run_dir).events()
    ev = ev[(ev["stage"] == "ingest") & (ev["kind"] == "drop")].sort_values("row_id")
    return {int(e.row_id): (e.reason, e.image_id, json.loads(e.detail)) for e in ev.itertuples()}


def test_exact_and_phash_duplicates_are_recorded_with_hash_and_first_row(run):
    root, stage, result = run
    ha, hb = to_hex(_hash("a.png")), to_hex(_hash("b.png"))
    assert _ingest_drops(root / "run") == {
        2: ("exact_duplicate", SHA["a.png"], {"duplicate_of_row": 0, "duplicate_of": SHA["a.png"], "phash": ha}),
        3: ("exact_duplicate", SHA["a.png"], {"duplicate_of_row": 0, "duplicate_of": SHA["a.png"], "phash": ha}),
        4: ("phash_duplicate", SHA["b_resized.jpg"],
            {"duplicate_of_row": 1, "duplicate_of": SHA["b.png"], "phash": hb, "distance": 0}),
    }  # fmt: skip
    dups = pd.read_parquet(stage / DUPLICATES)
    assert dups.to_dict("records") == [
        {"image_id": SHA["a.png"], "row_id": 3, "shard": "00001", "reason": "exact_duplicate", "duplicate_of_row": 0,
         "duplicate_of": SHA["a.png"], "phash": _hash("a.png"), "distance": 0},
        {"image_id": SHA["b_resized.jpg"], "row_id": 4, "shard": "00001", "reason": "phash_duplicate",
         "duplicate_of_row": 1, "duplicate_of": SHA["b.png"], "phash": _hash("b.png"), "distance": 0},
    ]  # fmt: skip
    # the row-2 copy never reached a shard (same bytes as row 0 in the same shard); rows 3 and 4 are stored
    stored = {s.name: s.read_table(["row_id", "phash"]).values.tolist() for s in list_shards(stage / "shards")}
    assert stored == {"00000": [[0, _hash("a.png")], [1, _hash("b.png")]],
                      "00001": [[3, _hash("a.png")], [4, _hash("b.png")], [5, _hash("c.png")]],
                      "00002": [[6, _hash("c_rotated.png")]]}  # fmt: skip
    ev = Ledger(root / "run").events()
    downloaded = ev[ev["reason"] == "downloaded"].sort_values("row_id")
    assert downloaded["row_id"].tolist() == [0, 1, 3, 4, 5, 6]
    assert json.loads(downloaded.iloc[3]["detail"])["phash"] == hb  # the copy's own hash, as computed at download
    outcome = ev[(ev["kind"] == "drop") | (ev["reason"] == "downloaded")]
    assert sorted(outcome.loc[outcome["kind"] == "drop", "row_id"]) == [2, 3, 4]
    assert result.counts["rows"] == 7 and result.counts["kept"] == 4 and result.counts["downloaded"] == 6
    assert result.counts["dropped"] == {"exact_duplicate": 2, "phash_duplicate": 1}


def test_later_stages_skip_the_duplicates(run, tmp_path):
    _root, stage, _ = run
    assert excluded(stage) == {"00001": {SHA["a.png"], SHA["b_resized.jpg"]}}
    out = tmp_path / "faces"
    shards = list_shards(stage / "shards")
    blur_faces(shards, excluded(stage), out, FacesConfig(enabled=False), ShardTracker("faces", out))
    kept = {s.name: s.read_table(["row_id"])["row_id"].tolist() for s in list_shards(out / "shards")}
    assert kept == {"00000": [0, 1], "00001": [5], "00002": [6]}


def _refinish(run, tmp_path, **overrides):
    _root, stage, _ = run
    copy = tmp_path / "run" / "stages" / "ingest"
    shutil.copytree(stage, copy)
    cfg = IngestConfig(**{**CFG, **overrides})
    result = finish(copy, cfg, ShardTracker("ingest", copy))
    dups = pd.read_parquet(copy / DUPLICATES)
    table = dups[["row_id", "reason", "duplicate_of_row", "distance"]].values.tolist()
    return result, table, _ingest_drops(tmp_path / "run")


@pytest.mark.parametrize(
    ("switches", "expected"),
    [
        ({}, [[3, "exact_duplicate", 0, 0], [4, "phash_duplicate", 1, 0]]),
        # exact off: the same bytes are still the same picture (distance 0) and the first row still wins
        ({"exact_dedup": False}, [[3, "phash_duplicate", 0, 0], [4, "phash_duplicate", 1, 0]]),
        ({"phash_dedup": False}, [[3, "exact_duplicate", 0, 0]]),
        ({"exact_dedup": False, "phash_dedup": False}, []),
        ({"phash_max_distance": 1}, [[3, "exact_duplicate", 0, 0], [4, "phash_duplicate", 1, 0]]),
        ({"phash_max_distance": 2}, [[3, "exact_duplicate", 0, 0], [4, "phash_duplicate", 1, 0],
                                     [6, "phash_duplicate", 5, 2]]),
    ],
)  # fmt: skip
def test_switches_and_hamming_threshold(run, tmp_path, switches, expected):
    result, dups, drops = _refinish(run, tmp_path, **switches)
    assert dups == expected
    # the within-shard copy (row 2) is dropped at download whatever the switches: a shard stores an image once
    assert {r: d[0] for r, d in drops.items()} == {2: "exact_duplicate"} | {r: reason for r, reason, *_ in expected}
    assert result.counts["kept"] == 6 - len(expected)
    if switches.get("phash_max_distance") == 2:
        assert drops[6][2] == {"duplicate_of_row": 5, "duplicate_of": SHA["c.png"], "distance": 2,
                               "phash": to_hex(_hash("c_rotated.png"))}  # fmt: skip


def test_near_duplicates_first_kept_row_wins():
    h = np.array([0b0000, 0b0001, 0b0011, 0b0111, 0b1111, 0b0000, -1], np.int64)
    assert near_duplicates(h, 0).tolist() == [-1, -1, -1, -1, -1, 0, -1]
    # 1 bit: row 1 matches row 0; row 2 is 2 bits from row 0 and 1 bit from row 1, which is not kept -> kept itself
    assert near_duplicates(h, 1).tolist() == [-1, 0, -1, 2, -1, 0, -1]
    assert near_duplicates(h, 2).tolist() == [-1, 0, 0, -1, 3, 0, -1]
    assert near_duplicates(h[:0], 3).tolist() == []


def test_near_duplicates_agrees_with_brute_force(rng):
    """Multi-index lookup vs comparing every pair, on hashes clustered so that many pairs are 1-6 bits apart."""
    centres = rng.integers(-(2**63), 2**63 - 1, 40, dtype=np.int64)
    flips = [sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 7), replace=False)) for _ in range(600)]
    h = np.array([(int(centres[i % 40]) % 2**64) ^ f for i, f in enumerate(flips)], np.uint64).view(np.int64)
    for d in (0, 1, 3, 6):
        kept: list[int] = []
        expected = []
        for i, v in enumerate(h.tolist()):
            match = [j for j in kept if distance(v, int(h[j])) <= d]
            expected.append(match[0] if match else -1)
            if not match:
                kept.append(i)
        assert near_duplicates(h, d).tolist() == expected
