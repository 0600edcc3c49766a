"""Every planted bad input ends in its own recorded reason; quirky images are kept and converted predictably.

One ingest run of the bad-input crawl (served on 127.0.0.1 by the demo server) is shared by the module; every
connection it makes is checked to go to a loopback address.
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curation.ingest import ingest
from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig
from infra.demo.crawl import BAD_INPUT_REASONS, build_bad_input_crawl
from infra.demo.server import DemoServer, free_port
from infra.lineage import Ledger
from infra.shards import iter_tar, list_shards
from infra.stage import ShardTracker

CFG = dict(
    shard_size=20, threads=16, timeout=0.6, max_download_seconds=1.5, min_image_size=10, max_aspect_ratio=10,
    max_download_bytes=4 * 2**20, encode_format="png", encode_quality=1, allow_hosts=["127.0.0.1"],
)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    port = free_port()
    crawl = build_bad_input_crawl(root / "crawl", port)
    stage = root / "run" / "stages" / "ingest"
    seen: list[str] = []
    real_connect = socket.socket.connect

    def connect(self, address):
        seen.append(address[0])
        assert ipaddress.ip_address(address[0]).is_loopback, f"connection to {address} attempted"
        return real_connect(self, address)

    with pytest.MonkeyPatch.context() as mp, DemoServer(root / "crawl" / "images", port, slow_seconds=2.0) as server:
        mp.setattr(socket.socket, "connect", connect)
        result = ingest(DataConfig(url_list=root / "crawl" / "urls.parquet"), stage, IngestConfig(**CFG),
                        ShardTracker("ingest", stage))  # fmt: skip
        hits = dict(server.hits)
    events = Ledger(root / "run").events()
    return {"crawl": crawl, "stage": stage, "result": result, "events": events, "hits": hits, "seen": seen, "port": port}


def _outcome(run, variant):
    row = int(run["crawl"].index[run["crawl"]["variant"] == variant][0])
    ev = run["events"][(run["events"]["row_id"] == row) & (run["events"]["kind"] != "info")]
    return row, ev


@pytest.mark.parametrize("variant", sorted(BAD_INPUT_REASONS))
def test_bad_input_ends_in_its_reason(run, variant):
    _row, ev = _outcome(run, variant)
    assert ev[["stage", "kind", "reason"]].values.tolist() == [["ingest", "drop", BAD_INPUT_REASONS[variant]]]
    detail = json.loads(ev.iloc[0]["detail"])
    if "status" in detail:  # img2dataset's own status and message are kept beside the reason code
        assert detail["status"] in ("failed_to_download", "failed_to_resize") and detail["error"]


def test_raw_messages_are_recorded(run):
    def error(variant):
        return json.loads(_outcome(run, variant)[1].iloc[0]["detail"])["error"]

    assert error("http_429_retry_after") == "HTTP Error 429: Too Many Requests (Retry-After: 120)"
    assert error("connection_reset") == "[Errno 104] Connection reset by peer"
    assert error("wrong_content_type") == "refused content type 'text/html'"
    assert error("redirect_to_metadata").startswith(
        "HTTP Error 302: redirect to a refused URL (url_private): http://169.254.169.254/"
    )
    assert error("svg") == "unsupported format: svg (vector image)"
    assert error("decompression_bomb").startswith("too many pixels to decode (Image size (900000000 pixels) exceeds")
    assert error("trickle") == "download took longer than max_download_seconds: timed out"
    assert json.loads(_outcome(run, "duplicate_url")[1].iloc[0]["detail"]) == {"duplicate_of_row": 0}


def test_every_row_has_exactly_one_ingest_outcome(run):
    ev, crawl = run["events"], run["crawl"]
    assert sorted(ev.loc[ev["reason"] == "input", "row_id"]) == list(range(len(crawl)))
    outcome = ev[(ev["kind"] == "drop") | (ev["reason"] == "downloaded")]
    assert outcome.groupby("row_id").size().to_dict() == {i: 1 for i in range(len(crawl))}
    downloaded = sorted(outcome.loc[outcome["reason"] == "downloaded", "row_id"])
    assert downloaded == sorted(crawl.index[crawl["expected"].isna()])
    counts = run["result"].counts
    # 4 good images, 8 quirks, one row per bad variant, and a second 404 and 500.
    assert counts["rows"] == len(crawl) == 4 + 8 + len(BAD_INPUT_REASONS) + 2 == 42
    assert counts["kept"] == counts["downloaded"] == 12
    assert sum(counts["dropped"].values()) == 30
    assert counts["dropped"]["http_404"] == counts["dropped"]["http_500"] == 2


def test_no_connection_leaves_loopback_and_refusals_send_nothing(run):
    assert run["seen"] and set(run["seen"]) == {"127.0.0.1"}
    hits = run["hits"]
    assert hits["/redirect/metadata/a.jpg"] == 1  # answered with a redirect that was refused, never followed
    assert hits["/ratelimit-once/1/quirk_retry_after.png"] == 2  # Retry-After: 1 waited out, asked once more
    assert hits["/ratelimit/120/ratelimited.png"] == 1  # Retry-After: 120 is recorded, not waited for
    assert hits["/redirect/loop/a.jpg"] == 5  # urllib stops a loop at its fifth visit


def _stored(run, variant):
    row = int(run["crawl"].index[run["crawl"]["variant"] == variant][0])
    for shard in list_shards(run["stage"] / "shards"):
        table = shard.read_table().set_index("image_id")
        for key, _ext, data in iter_tar(shard.tar):
            if int(table.loc[key, "row_id"]) == row:
                return Image.open(io.BytesIO(data)), table.loc[key]
    raise AssertionError(f"{variant} not stored")


def _served(run, name):
    return Image.open(run["stage"].parents[2] / "crawl" / "images" / name)


def test_exif_orientation_is_applied(run):
    img, meta = _stored(run, "exif_rotated")
    assert (img.size, img.mode, int(meta["original_width"]), int(meta["original_height"])) == ((48, 64), "RGB", 48, 64)
    src = _served(run, "quirk_exif_rotated.jpg")
    expected = np.asarray(src.transpose(Image.Transpose.ROTATE_270).convert("RGB"), np.int16)
    assert np.abs(np.asarray(img, np.int16) - expected).max() <= 1  # OpenCV's and Pillow's JPEG decoders


def test_sixteen_bit_png_keeps_its_top_byte(run):
    img, _ = _stored(run, "png16")
    src = np.asarray(_served(run, "quirk_png16.png"), np.uint16)
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), (src >> 8).astype(np.uint8))


def test_alpha_is_composited_on_white(run):
    img, _ = _stored(run, "palette_alpha")
    src = _served(run, "quirk_palette_alpha.png").convert("RGBA")
    a = np.asarray(src, np.float64)[..., 3:] / 255
    expected = np.asarray(src, np.float64)[..., :3] * a + 255 * (1 - a)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), np.rint(expected).astype(np.uint8))
    grey, _ = _stored(run, "grey_alpha")
    la = np.asarray(_served(run, "quirk_grey_alpha.png").convert("LA"), np.float64)
    assert grey.mode == "L"
    expected = la[..., 0] * la[..., 1] / 255 + 255 * (1 - la[..., 1] / 255)
    assert np.abs(np.asarray(grey, np.float64) - expected).max() <= 1


def test_animated_gif_keeps_its_first_frame_and_cmyk_becomes_rgb(run):
    img, _ = _stored(run, "animated_gif")
    first = _served(run, "quirk_animated.gif").convert("RGB")
    np.testing.assert_array_equal(np.asarray(img), np.asarray(first))
    cmyk, _ = _stored(run, "cmyk_jpeg")
    assert cmyk.mode == "RGB"
    src = np.asarray(_served(run, "quirk_cmyk.jpg").convert("RGB"), np.int16)
    assert np.abs(np.asarray(cmyk, np.int16) - src).max() <= 1


def test_quirky_transports_deliver_their_image(run):
    for variant, name in (("retry_after_once", "quirk_retry_after.png"), ("redirect_to_image", "quirk_redirected.png")):
        img, _ = _stored(run, variant)
        np.testing.assert_array_equal(np.asarray(img), np.asarray(_served(run, name).convert("RGB")))


def test_rerun_skips_finished_shards(run, tmp_path):
    tracker = ShardTracker("ingest", run["stage"])
    before = {p.name: p.stat().st_mtime_ns for p in (run["stage"] / "shards").iterdir()}
    result = ingest(DataConfig(url_list=run["stage"].parents[2] / "crawl" / "urls.parquet"), run["stage"],
                    IngestConfig(**CFG), tracker)  # fmt: skip (no server: nothing may be fetched)
    assert {p.name: p.stat().st_mtime_ns for p in (run["stage"] / "shards").iterdir()} == before
    assert result.counts == run["result"].counts
    assert pd.read_parquet(run["stage"] / "plan" / "inputs" / "00000.parquet")["row_id"].tolist() == list(range(20))
