"""Corpus: the composition table in the style of paper Table 15, exact values from a seed-stats table and a corpus
manifest (retrieval rows, "as is" rows, a set that retrieved images none of which survived, the total)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from curation.corpus import composition, markdown_table


def _stats() -> pd.DataFrame:
    """retrieve's seed_stats.parquet: one row per seed set."""
    cols = ["seed_set", "method", "queries", "n_neighbors", "hits", "retrieved", "collisions", "max_hits_per_image"]
    rows = [("in1k", "sample", 5, 32, 160, 100, 9, 3), ("small", "cluster", 10, None, 40, 40, 0, 1),
            ("curated", "as_is", 0, None, 0, 0, 0, 0), ("nn", "sample", 3, 4, 12, 12, 0, 1)]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def _corpus_table() -> pd.DataFrame:
    """corpus.parquet: 60 + 25 retrieved pool images, 7 images of an "as is" set, in1k's own 5 images as is."""
    sets = [("in1k", "sample")] * 60 + [("small", "cluster")] * 25 + [("curated", "as_is")] * 7 + [("in1k", "as_is")] * 5
    return pd.DataFrame([{"image_id": f"i{i}", "shard": f"{i // 50:05d}", "row_id": i if m != "as_is" else -1,
                          "source": "pool" if m != "as_is" else s, "seed_set": s, "method": m}
                         for i, (s, m) in enumerate(sets)])  # fmt: skip


def test_composition_exact_values() -> None:
    comp = composition(_corpus_table(), _stats())
    nan = np.nan
    expected = pd.DataFrame(
        [("curated", 7.0, "as is", nan, 7), ("in1k", 5.0, "as is", nan, 5), ("in1k", 5.0, "sample (k=32)", 100.0, 60),
         ("nn", 3.0, "sample (k=4)", 12.0, 0), ("small", 10.0, "cluster", 40.0, 25), ("total", nan, "", nan, 97)],
        columns=["dataset", "images", "retrieval", "retrieved", "final"],
    )  # fmt: skip
    pd.testing.assert_frame_equal(comp, expected)
    assert markdown_table(comp) == (
        "| dataset | images | retrieval | retrieved | final |\n|---|---|---|---|---|\n"
        "| curated | 7 | as is | – | 7 |\n| in1k | 5 | as is | – | 5 |\n| in1k | 5 | sample (k=32) | 100 | 60 |\n"
        "| nn | 3 | sample (k=4) | 12 | 0 |\n| small | 10 | cluster | 40 | 25 |\n| total | – |  | – | 97 |\n"
    )


def test_composition_of_an_empty_corpus() -> None:
    empty = pd.DataFrame(columns=["image_id", "shard", "row_id", "source", "seed_set", "method"])
    comp = composition(empty, _stats().iloc[[3]])
    assert comp[["dataset", "retrieval", "final"]].values.tolist() == [["nn", "sample (k=4)", 0], ["total", "", 0]]
    assert comp["retrieved"].tolist()[0] == 12.0


def test_a_set_added_as_is_keeps_each_images_format_from_a_tar_and_from_odd_file_names(tmp_path) -> None:
    """Before, an image's extension was cut from its display name: a tar's `val.tar:val/n01/a` gave the member
    `<id>.tar:val/n01/a` (a path inside the corpus tar), and a Latin-1 file name stopped the parquet writer."""
    import io
    import json
    import os

    import pytest
    from PIL import Image

    from curation.corpus import build_corpus
    from infra.config.curation import CorpusConfig
    from infra.config.data import SeedSetConfig
    from infra.shards import iter_tar, list_shards
    from tests.tars import tar_with

    def png(v: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (v, v, v)).save(buf, "PNG")
        return buf.getvalue()

    tar_with(tmp_path / "val.tar", [("val/n01/a.png", png(1)), ("val/n01/a.cls", b"0")])
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / os.fsdecode(b"caf\xe9.png")).write_bytes(png(2))
    phone = tmp_path / "phone"  # what every decoder does not read alike: converted, at its own size
    phone.mkdir()
    pytest.importorskip("pillow_heif").from_pillow(Image.new("RGB", (24, 16), (200, 30, 30))).save(phone / "a.HEIC")
    Image.fromarray(np.full((9, 7), 0x8000, np.uint16)).save(phone / "b.png")  # 16-bit grey
    turned = Image.new("RGB", (12, 8), (10, 200, 10))
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(phone / "c.jpg", exif=exif)
    (tmp_path / "pool").mkdir()
    selected = pd.DataFrame(columns=["image_id", "row_id", "shard", "seed_set", "method"])
    as_is = [SeedSetConfig(name="tarred", path=tmp_path / "val.tar", retrieval="as_is"),
             SeedSetConfig(name="mine", path=folder, retrieval="as_is"),
             SeedSetConfig(name="phone", path=phone, retrieval="as_is")]  # fmt: skip
    build_corpus(selected, tmp_path / "pool", as_is, pd.DataFrame(), tmp_path / "corpus", CorpusConfig())
    (shard,) = list_shards(tmp_path / "corpus" / "shards")
    members = {(key, ext): data for key, ext, data in iter_tar(shard.tar, sidecars=True)}
    assert sorted(ext for _, ext in members) == ["jpg", "jpg", "jpg", "json", "json", "json", "json", "json", "png",
                                                 "png"] and all("/" not in k for k, _ in members)  # fmt: skip
    table = pd.read_parquet(tmp_path / "corpus" / "corpus.parquet").set_index("path")
    assert sorted(table.index) == ["a.HEIC", "b.png", "c.jpg", "caf\\xe9.png", "val.tar:val/n01/a"]
    pixels = {p: np.asarray(Image.open(io.BytesIO(members[(table.at[p, "image_id"], "jpg")])))
              for p in ("a.HEIC", "b.png", "c.jpg")}  # fmt: skip
    assert pixels["a.HEIC"].shape == (16, 24, 3) and abs(pixels["a.HEIC"].mean(axis=(0, 1)) - (200, 30, 30)).max() < 8
    assert pixels["b.png"].shape == (9, 7) and abs(int(pixels["b.png"].mean()) - 0x80) <= 1  # the top byte, grey
    assert pixels["c.jpg"].shape == (12, 8, 3)  # the rotation applied, not left to the reader
    events = pd.concat(pd.read_parquet(f) for f in (tmp_path / "corpus" / "ledger").glob("*.parquet"))
    converted = sorted(json.loads(d).get("converted_from", "-") for d in events["detail"])
    assert converted == ["-", "-", "heic", "jpg", "png"]
