"""Face boxes shipped with the pool (DataComp's `face_bboxes`, `data.face_boxes_col`): carried from the URL list
through ingest into the shards, blurred by the faces stage besides its detector's, and a row whose boxes cannot be
read is dropped with its reason instead of being kept unblurred."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curation.faces import blur_faces, given_boxes
from curation.ingest import excluded, ingest
from curation.urls import iter_url_rows, parse_face_boxes
from infra.config import load_config
from infra.config.data import DataConfig
from infra.config.ingest import FacesConfig, IngestConfig
from infra.lineage import Ledger
from infra.shards import iter_shard_images, list_shards
from infra.stage import ShardTracker


def test_parse_face_boxes():
    assert parse_face_boxes(None) == []
    assert parse_face_boxes("[]") == []
    assert parse_face_boxes("[[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1]]") == [(0.1, 0.2, 0.5, 0.6), (0.0, 0.0, 1.0, 1.0)]
    assert parse_face_boxes("[[-0.004, 0.2, 1.003, 0.6]]") == [(0.0, 0.2, 1.0, 0.6)]  # a hair outside: clipped
    for bad, message in [("{", "not JSON"), ('{"x": 1}', "must be a list"), ("[[0.1, 0.2, 0.5]]", r"\[x0, y0"),
                         ('[["a", 0, 1, 1]]', r"\[x0, y0"), ("[[0.5, 0.2, 0.1, 0.6]]", "inverted"),
                         ("[[10, 20, 50, 60]]", "relative to the image")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_face_boxes(bad)


def test_given_boxes_in_pixels_of_the_stored_image():
    # 0.1-0.5 of 100 px wide -> x 10..50; 0.25-0.75 of 40 px high -> y 10..30; a sliver keeps at least one pixel
    assert given_boxes("[[0.1, 0.25, 0.5, 0.75], [0.999, 0.0, 1.0, 0.001]]", (100, 40)) == [(10, 10, 40, 20),
                                                                                           (99, 0, 1, 1)]


def test_url_lists_carry_boxes_as_json_whatever_the_format(tmp_path):
    boxes = [[[0.1, 0.2, 0.3, 0.4]], [], None]
    pd.DataFrame({"url": ["http://a/1", "http://a/2", "http://a/3"], "fb": boxes}).to_parquet(tmp_path / "l.parquet")
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"url": f"http://a/{i}", "fb": b}) + "\n"
                                              for i, b in enumerate(boxes)))  # fmt: skip
    pd.DataFrame({"url": ["http://a/1", "http://a/2"], "fb": ["[[0.1, 0.2, 0.3, 0.4]]", None]}).to_csv(
        tmp_path / "l.csv", index=False)  # fmt: skip
    want = ["[[0.1, 0.2, 0.3, 0.4]]", "[]", None]
    for name, expect in (("l.parquet", want), ("l.jsonl", want), ("l.csv", [want[0], None])):
        rows = pd.concat(iter_url_rows(DataConfig(url_list=tmp_path / name, face_boxes_col="fb")))
        assert rows["face_boxes"].tolist() == expect, name
    rows = pd.concat(iter_url_rows(DataConfig(url_list=tmp_path / "l.parquet")))  # no column configured
    assert rows["face_boxes"].tolist() == [None, None, None]


def test_cropping_resize_modes_are_refused_with_given_boxes():
    with pytest.raises(ValueError, match="keep_ratio, keep_ratio_largest or no, not center_crop"):
        load_config(None, ["data.face_boxes_col=face_bboxes", "ingest.resize_mode=center_crop"])
    assert load_config(None, ["data.face_boxes_col=face_bboxes"]).ingest.resize_mode == "keep_ratio"


def _noise(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_given_boxes_are_blurred_and_recorded_and_unreadable_ones_drop_the_row(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        (pool / f"{i}.png").write_bytes(_noise(i))
    boxes = ["[[0.25, 0.25, 0.5, 0.5]]", None, "[[0.5, 0.5, 0.25, 0.75]]"]  # row 2: inverted
    pd.DataFrame({"url": [(pool / f"{i}.png").as_uri() for i in range(3)], "face_bboxes": boxes}).to_parquet(
        tmp_path / "urls.parquet")  # fmt: skip
    data = DataConfig(url_list=tmp_path / "urls.parquet", face_boxes_col="face_bboxes")
    cfg = IngestConfig(local_roots=[pool], encode_format="png", encode_quality=3, image_size=64, threads=2)
    stage = tmp_path / "run" / "stages" / "ingest"
    ingest(data, stage, cfg, ShardTracker("ingest", stage))
    out = tmp_path / "run" / "stages" / "faces"
    faces = FacesConfig(enabled=False, margin=0.0)  # no detector: only the given boxes
    blur_faces(list_shards(stage / "shards"), excluded(stage), out, faces, ShardTracker("faces", out))

    events = Ledger(tmp_path / "run").events()
    drop = events[events["kind"] == "drop"]
    assert drop[["row_id", "reason"]].values.tolist() == [[2, "face_boxes_malformed"]]
    assert "inverted" in json.loads(drop["detail"].iloc[0])["error"]
    recorded = {int(r): json.loads(d) for r, d in events.loc[events["reason"] == "faces", ["row_id", "detail"]].values}
    assert {r: (d["n_faces"], d["n_given"], d["boxes"]) for r, d in recorded.items()} == {
        0: (1, 1, [[16, 12, 16, 12]]), 1: (0, 0, [])}  # 0.25-0.5 of 64 x 48 px
    before = {m["row_id"]: np.asarray(Image.open(io.BytesIO(d))) for m, d in
              iter_shard_images(list_shards(stage / "shards")[0])}  # fmt: skip
    after = {m["row_id"]: np.asarray(Image.open(io.BytesIO(d))) for m, d in
             iter_shard_images(list_shards(out / "shards")[0])}  # fmt: skip
    assert sorted(after) == [0, 1]
    inside = (slice(12, 24), slice(16, 32))
    changed = np.abs(after[0].astype(int) - before[0].astype(int)).sum(axis=2) > 0
    assert changed[inside].mean() > 0.9 and changed.sum() == changed[inside].sum()  # the box, and only the box
    assert np.array_equal(after[1], before[1])  # no boxes: untouched
    table = pd.read_parquet(list_shards(stage / "shards")[0].table).set_index("row_id")
    assert table.loc[0, "face_boxes"] == "[[0.25, 0.25, 0.5, 0.5]]" and table.loc[1, "face_boxes"] is None
