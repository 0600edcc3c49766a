"""The one table of ingest reasons, both ways: every reason in it is produced by an ingest run here (one row
planted for each), nothing outside it can be recorded, docs/ingest.md holds the same table, and retry-failed
follows its classes."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import curation.imageguard
import curation.ingest
import curation.netguard
import curation.opener
from curation.ingest import download_reason, failed_rows, ingest
from curation.reasons import BY_NAME, REASONS, TRANSIENT, reason
from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig
from infra.lineage import Ledger, LedgerWriter
from infra.stage import ShardTracker
from tests.curation.conftest import blob_image
from tests.curation.hostile import HOST, Behaviour, HostileServer, Sandbox

ROOT = Path(__file__).resolve().parents[2]
# Reasons no test can produce here, and why (each is still mapped from its real message where it has one).
UNPRODUCIBLE = {
    "lost_by_downloader": "img2dataset loses a sample only when its own per-sample code raises",
    "file_unreadable": "tests (and CI) run as root, whom permission bits do not stop",
}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _pattern(w: int, h: int, seed: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fx, fy = np.random.default_rng(seed).uniform(0.03, 0.2, 2)
    arr = 127 + 120 * np.stack([np.sin(xx * fx), np.cos(yy * fy), np.sin((xx + yy) * fx)], -1)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    _pattern(64, 64, 9).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[: (data.rfind(b"\xff\xda") + len(data)) // 2] + b"\xff\xd9"


def _bad_crc_png() -> bytes:
    data = bytearray(_png(_pattern(40, 40, 8)))
    i = data.find(b"IDAT")
    crc = i + 4 + int.from_bytes(data[i - 4 : i], "big")
    data[crc] ^= 0xFF
    return bytes(data)


def _zoo(server: HostileServer, pool: Path, outside: Path) -> list[tuple[object, str]]:
    """(list row, the reason it must end in): one row per reason of the table."""
    good, smooth = _png(_pattern(48, 48, 1)), blob_image(2, 64)  # blobs: a resized copy keeps its DCT hash
    ok = server.url(Behaviour(body=good))
    b = server.url
    rows: list[tuple[object, str]] = [
        ({"url": ok}, "downloaded"),
        ("{not json", "list_row_malformed"),
        ({"url": "http://exa mple.com/a.png"}, "url_malformed"),
        ({"url": "ftp://example.com/a.png"}, "url_scheme"),
        ({"url": "http://user:pass@img.test/a.png"}, "url_credentials"),
        ({"url": "http://0x0a.1/a.png"}, "url_private"),
        ({"url": (outside / "x.png").as_uri()}, "path_outside_roots"),
        ({"url": " " + ok.upper().replace("/S/", "/s/")}, "url_duplicate"),
        ({"url": b(Behaviour(body=good)) + "?b", "boxes": "[[0.5, 0.5]]"}, "face_boxes_malformed"),
        ({"url": (pool / "missing.png").as_uri()}, "file_missing"),
        ({"url": b(Behaviour(302, b"", None, [("Location", "file:///etc/passwd")]))}, "redirect_refused"),
        ({"url": b(Behaviour(302, b"", None, [("Location", "http://[bad")]))}, "redirect_malformed"),
        ({"url": b(Behaviour(302, b"", None, [("Location", f"/s/{len(server.behaviours)}")]))}, "redirect_loop"),
        ({"url": b(Behaviour(body=good, headers=[("X-Robots-Tag", "noai")]))}, "robots_disallowed"),
        ({"url": b(Behaviour(body=good, ctype="text/html"))}, "content_type"),
        ({"url": b(Behaviour(body=b"\x89PNG" + b"\0" * 300_000))}, "too_large"),
        ({"url": b(Behaviour(silent=True))}, "timeout"),
        ({"url": f"http://nx.test:{server.port}/a.png"}, "dns_error"),
        ({"url": f"http://{HOST}:{_closed_port()}/a.png"}, "connection_refused"),
        ({"url": b(Behaviour(reset=True))}, "connection_reset"),
        ({"url": b(Behaviour(body=good, length_delta=50))}, "connection_closed"),
        ({"url": b(Behaviour(body=good), scheme="https")}, "tls_error"),
        ({"url": b(Behaviour(404, b"no", "text/plain"))}, "http_404"),
        ({"url": b(Behaviour(raw=b"SPAM\r\n\r\n"))}, "download_error"),
        ({"url": b(Behaviour(body=b""))}, "empty_response"),
        ({"url": b(Behaviour(body=b"<html><body>moved</body></html>"))}, "not_an_image"),
        ({"url": b(Behaviour(body=b'<svg xmlns="http://www.w3.org/2000/svg"/>', ctype="image/svg+xml"))},
         "unsupported_format"),
        ({"url": b(Behaviour(body=_truncated_jpeg(), ctype="image/jpeg"))}, "truncated_image"),
        ({"url": b(Behaviour(body=_bad_crc_png()))}, "decode_error"),
        ({"url": b(Behaviour(body=_png(_pattern(400, 400, 3))))}, "decompression_bomb"),
        ({"url": b(Behaviour(body=_png(_pattern(4, 4, 4))))}, "image_too_small"),
        ({"url": b(Behaviour(body=_png(_pattern(300, 200, 5))))}, "image_too_large"),
        ({"url": b(Behaviour(body=_png(_pattern(200, 12, 6))))}, "aspect_ratio_too_large"),
        ({"url": b(Behaviour(body=good)) + "?copy"}, "exact_duplicate"),
        ({"url": b(Behaviour(body=_png(smooth)))}, "downloaded"),
        ({"url": b(Behaviour(body=_png(smooth.resize((96, 96), Image.BICUBIC))))}, "phash_duplicate"),
    ]  # fmt: skip
    for code in (408, 429, 500, 502, 503, 504):
        headers = [("Retry-After", "120")] if code in (429, 503) else []
        rows.append(({"url": b(Behaviour(code, b"busy", "text/plain", headers))}, f"http_{code}"))
    return rows


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    pool, outside = root / "pool", root / "outside"
    pool.mkdir()
    outside.mkdir()
    (outside / "x.png").write_bytes(_png(_pattern(20, 20, 7)))
    with pytest.MonkeyPatch.context() as mp, HostileServer(non_http="answer") as server:
        sandbox = Sandbox({"img.test": HOST}).install(mp)
        rows = _zoo(server, pool, outside)
        with open(root / "urls.jsonl", "w") as f:
            for row, _ in rows:
                f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
        stage = root / "run" / "stages" / "ingest"
        cfg = IngestConfig(threads=48, timeout=3, max_download_seconds=1.5, allow_hosts=[HOST], local_roots=[pool],
                           max_download_bytes=200_000, retry_after_max=0, max_decode_pixels=100_000,
                           min_image_size=10, max_image_area=50_000, max_aspect_ratio=10)  # fmt: skip
        data = DataConfig(url_list=root / "urls.jsonl", face_boxes_col="boxes")
        ingest(data, stage, cfg, ShardTracker("ingest", stage))
    events = Ledger(root / "run").events()
    return {"rows": rows, "events": events, "stage": stage, "lookups": sandbox.lookups}


def test_every_reason_in_the_table_is_produced(zoo):
    ev = zoo["events"]
    drops = ev[ev["kind"] == "drop"].groupby("row_id")["reason"].apply(list).to_dict()
    downloaded = set(ev.loc[ev["reason"] == "downloaded", "row_id"])
    assert all(len(d) == 1 for d in drops.values())  # one drop at most (a dedup drop follows its download)
    assert set(drops) | downloaded == set(range(len(zoo["rows"])))
    got = [drops[i][0] if i in drops else "downloaded" for i in range(len(zoo["rows"]))]
    assert got == [expected for _, expected in zoo["rows"]]
    produced = {reason(r).name for r in got if r != "downloaded"}
    assert set(BY_NAME) - produced == set(UNPRODUCIBLE)
    assert "user:pass@img.test" not in zoo["lookups"]


def test_unproducible_reasons_are_mapped_from_their_real_messages():
    assert download_reason("failed_to_download", "<urlopen error [Errno 13] Permission denied: '/p/a.png'>") == (
        "file_unreadable"
    )
    assert "lost_by_downloader" in Path(curation.ingest.__file__).read_text()


def test_nothing_outside_the_table_can_be_recorded():
    """Every reason code written in the ingest code is in the table, and recording any other one fails."""
    codes = {code for _, code in (*curation.ingest._DOWNLOAD_NEEDLES, *curation.ingest._FILE_NEEDLES,
                                  *curation.ingest._IMAGE_NEEDLES)}  # fmt: skip
    for module in (curation.ingest, curation.netguard, curation.opener, curation.imageguard):
        text = Path(module.__file__).read_text()
        codes |= set(re.findall(r'(?:Verdict|LocalFileRefused|_drop\(ledger,)\s*\(?\s*"([a-z0-9_]+)"', text))
        codes |= set(re.findall(r'return "([a-z_]+)"\n', text)) & {r.name for r in REASONS}
    assert len(codes) > 30 and all(reason(c) for c in codes)
    with pytest.raises(KeyError, match=r"not in curation/reasons\.py"):
        curation.ingest._drop(LedgerWriter("ingest"), "made_up_reason", row_id=0)
    assert reason("http_418").name == "http_*" and reason("http_503").cls == "transient"


def test_the_docs_table_is_the_code_table():
    text = (ROOT / "docs" / "ingest.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9_*]+)` \| (\w+) \| (\w+) \| (.+) \|$", text, re.M)
    assert [(n, c, s) for n, c, s, _ in rows] == [(r.name, r.cls, r.step) for r in REASONS]
    assert [m for *_, m in rows] == [r.meaning for r in REASONS]


def test_retry_failed_follows_the_classes(zoo):
    failed = failed_rows(zoo["stage"])
    expected = sorted(i for i, (_, why) in enumerate(zoo["rows"]) if why in TRANSIENT)
    assert failed["row_id"].tolist() == expected
    assert set(failed["reason"]) == {"timeout", "dns_error", "connection_refused", "connection_reset",
                                     "connection_closed", "download_error", "http_408", "http_429", "http_500",
                                     "http_502", "http_503", "http_504"}  # fmt: skip
    assert failed_rows(zoo["stage"], ["http_4*", "tls_error"])["reason"].tolist() == [
        "tls_error", "http_404", "http_408", "http_429"]  # fmt: skip (permanent ones on request)
    for before in (["url_credentials"], ["*_duplicate"], ["list_*"]):
        with pytest.raises(ValueError, match="decided without downloading; a retry cannot change them"):
            failed_rows(zoo["stage"], before)
    for policy in (["robots_disallowed"], ["redirect_*"], ["too_large"], ["decompression_bomb"]):
        with pytest.raises(ValueError, match="decided by the run's policy"):
            failed_rows(zoo["stage"], policy)
