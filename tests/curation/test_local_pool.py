"""A folder of local images as the pool: `lvd folder-urls` lists it as file:// URLs, ingest reads them through
img2dataset under `ingest.local_roots` only, and every file ends in one recorded outcome."""

from __future__ import annotations

import io
import urllib.request

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curation.ingest import download_reason, ingest
from curation.netguard import LocalFileRefused, UrlGuard, local_file
from curation.opener import guarded_opener
from curation.urls import folder_url_list
from flows.cli import main
from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig
from infra.domains import LOCAL, host_of
from infra.lineage import Ledger
from infra.stage import ShardTracker


def _image(seed: int, size: int = 32, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def pool(tmp_path):
    """pool/ with images, a duplicate, a broken file, a text file, an oversized image, a link out of the pool."""
    root, outside = tmp_path / "pool", tmp_path / "outside"
    for d in ("cats", "dogs/sub"):
        (root / d).mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(_image(9, fmt="JPEG"))
    (root / "big.png").write_bytes(_image(1, size=200))  # ~120 kB: over the 50 kB limit below
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "cats" / "a.jpg").write_bytes(_image(2, fmt="JPEG"))
    (root / "cats" / "b.png").write_bytes(_image(3))
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "dogs" / "dup.png").write_bytes(_image(3))
    (root / "dogs" / "gone.jpg").write_bytes(_image(4, fmt="JPEG"))
    (root / "dogs" / "sub" / "c.JPG").write_bytes(_image(5, fmt="JPEG"))
    (root / "linkdir").symlink_to(outside, target_is_directory=True)  # not followed when listing
    return root


NAMES = ["big.png", "escape.jpg", "notes.txt", "cats/a.jpg", "cats/b.png", "dogs/broken.jpg", "dogs/dup.png",
         "dogs/gone.jpg", "dogs/sub/c.JPG"]  # fmt: skip


def test_folder_listing_is_sorted_streams_and_says_what_it_left_out(pool, tmp_path):
    out = tmp_path / "all.parquet"
    listing = folder_url_list(pool, out, all_files=True, chunk_rows=4)  # 3 chunks
    urls = pd.read_parquet(out)
    assert (listing.listed, listing.skipped) == (9, 0)
    assert urls["url"].tolist() == [(pool / n).as_uri() for n in NAMES]
    assert urls["source"].tolist() == ["pool"] * 3 + ["cats"] * 2 + ["dogs"] * 4
    images = folder_url_list(pool, tmp_path / "images.parquet")
    assert (images.listed, images.skipped, images.skipped_examples) == (8, 1, ("notes.txt",))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        folder_url_list(pool / "cats" / "a.jpg", tmp_path / "x.parquet")


def test_listing_a_folder_again_keeps_the_rows_and_adds_new_files_after_them(pool, tmp_path):
    """`lvd folder-urls` on its own earlier list: the old rows as they were (a gone file's too), new files after them
    in name order, in chunks smaller than either part; nothing new leaves the file untouched; anything else there is
    refused, not overwritten; `fresh` writes the list anew."""
    import os

    from curation.urls import FolderListError

    out = tmp_path / "pool.parquet"
    folder_url_list(pool, out)
    before = pd.read_parquet(out)
    (pool / "cats" / "0new.png").write_bytes(_image(6))  # sorts first: a fresh listing would shift every row
    (pool / "zebra.jpg").write_bytes(_image(7, fmt="JPEG"))
    (pool / "dogs" / "gone.jpg").unlink()
    listing = folder_url_list(pool, out, chunk_rows=3)
    after = pd.read_parquet(out)
    assert (listing.listed, listing.kept, listing.missing) == (10, 8, 1)
    pd.testing.assert_frame_equal(after.iloc[:8], before)
    assert after["url"].tolist()[8:] == [(pool / "zebra.jpg").as_uri(), (pool / "cats" / "0new.png").as_uri()]
    assert after["source"].tolist()[8:] == ["pool", "cats"]

    os.utime(out, (0, 0))
    data = out.read_bytes()
    again = folder_url_list(pool, out)
    assert (again.listed, again.kept, again.missing) == (10, 10, 1)
    assert out.read_bytes() == data and out.stat().st_mtime == 0  # untouched: the run's key stays

    other = tmp_path / "other.parquet"
    pd.DataFrame({"URL": ["http://x/a.jpg"]}).to_parquet(other)
    with pytest.raises(FolderListError, match="not a list `lvd folder-urls` wrote"):
        folder_url_list(pool, other)
    assert pd.read_parquet(other).columns.tolist() == ["URL"]
    fresh = folder_url_list(pool, out, fresh=True)
    assert (fresh.listed, fresh.kept) == (9, 0)
    assert pd.read_parquet(out)["url"].tolist()[3] == (pool / "cats" / "0new.png").as_uri()


def test_guard_reads_files_only_under_the_roots(pool, tmp_path):
    guard = UrlGuard(IngestConfig(local_roots=[pool]))
    assert guard.check((pool / "cats" / "a.jpg").as_uri()) is None
    assert guard.check((pool / "escape.jpg").as_uri()) == "path_outside_roots"  # a link out of the pool
    assert guard.check((pool / "cats" / ".." / ".." / "outside" / "secret.jpg").as_uri()) == "path_outside_roots"
    assert guard.check(pool.as_uri()) == "path_outside_roots"  # the root itself is not a file under it
    assert guard.check("file://example.com" + (pool / "cats" / "a.jpg").as_posix()) == "url_malformed"
    assert UrlGuard(IngestConfig()).check((pool / "cats" / "a.jpg").as_uri()) == "url_scheme"  # no roots: refused
    with pytest.raises(FileNotFoundError, match=r"ingest.local_roots: .* is not a folder"):
        UrlGuard(IngestConfig(local_roots=[tmp_path / "missing"]))


def test_the_opener_checks_again_at_open(pool, tmp_path):
    """A link that changed between planning and download is refused when opened; the limits of a download apply."""
    cfg = IngestConfig(local_roots=[pool], max_download_bytes=50_000)
    link = pool / "cats" / "later.jpg"
    link.symlink_to(tmp_path / "outside" / "secret.jpg")
    with guarded_opener(cfg):
        with urllib.request.urlopen((pool / "cats" / "a.jpg").as_uri(), timeout=5) as r:
            assert r.read() == (pool / "cats" / "a.jpg").read_bytes()
            assert r.headers["Content-Type"] == "image/jpeg"
        errors = {}
        for name in ("cats/later.jpg", "notes.txt", "big.png", "cats/nothing.jpg"):
            with pytest.raises(Exception) as err:  # each kind: its reason, below
                urllib.request.urlopen((pool / name).as_uri(), timeout=5)
            errors[name] = download_reason("failed_to_download", str(err.value))
    assert errors == {"cats/later.jpg": "path_outside_roots", "notes.txt": "content_type", "big.png": "too_large",
                      "cats/nothing.jpg": "file_missing"}  # fmt: skip
    with pytest.raises(LocalFileRefused, match=r"outside ingest\.local_roots"):
        local_file(link.as_uri(), [pool])
    assert host_of(link.as_uri(), local=True) == LOCAL


def test_a_local_pool_is_ingested_with_one_outcome_per_file(pool, tmp_path, capsys):
    urls = tmp_path / "urls.parquet"
    assert main(["folder-urls", str(pool), str(urls), "--all-files"]) == 0
    assert f"ingest.local_roots=[{pool.resolve()}]" in capsys.readouterr().out
    (pool / "dogs" / "gone.jpg").unlink()  # listed, then deleted before the download
    stage = tmp_path / "run" / "stages" / "ingest"
    cfg = IngestConfig(local_roots=[pool], shard_size=4, threads=2, max_download_bytes=50_000, encode_format="png",
                       encode_quality=3)
    result = ingest(DataConfig(url_list=urls), stage, cfg, ShardTracker("ingest", stage))
    events = Ledger(tmp_path / "run").events()
    terminal = events[events["kind"] != "info"].set_index("row_id")["reason"].to_dict()
    downloaded = sorted(events.loc[events["reason"] == "downloaded", "row_id"])
    outcome = {NAMES[r]: terminal.get(r, "downloaded" if r in downloaded else None) for r in range(len(NAMES))}
    assert outcome == {
        "big.png": "too_large", "escape.jpg": "path_outside_roots", "notes.txt": "content_type",
        "cats/a.jpg": "downloaded", "cats/b.png": "downloaded", "dogs/broken.jpg": "truncated_image",
        "dogs/dup.png": "exact_duplicate", "dogs/gone.jpg": "file_missing", "dogs/sub/c.JPG": "downloaded",
    }  # fmt: skip
    assert result.counts == {"rows": 9, "downloaded": 3, "kept": 3, "dropped": {
        "content_type": 1, "exact_duplicate": 1, "file_missing": 1, "path_outside_roots": 1, "too_large": 1,
        "truncated_image": 1}}  # fmt: skip
    inputs = events[events["reason"] == "input"].sort_values("row_id")
    assert inputs["url"].tolist() == [(pool / n).as_uri() for n in NAMES]  # lineage: the file each image came from


def _encode(seed: int, suffix: str) -> bytes:
    """A distinct 40x24 image in the format its suffix names."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(np.repeat(np.repeat(rng.integers(0, 255, (6, 10, 3), dtype=np.uint8), 4, 0), 4, 1))
    if suffix in (".heic", ".heif", ".hif"):
        buf = io.BytesIO()
        pytest.importorskip("pillow_heif").from_pillow(img).save(buf, quality=95)
        return buf.getvalue()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".apng": "PNG",
           ".gif": "GIF", ".webp": "WEBP", ".avif": "AVIF", ".bmp": "BMP", ".dib": "BMP", ".tif": "TIFF",
           ".tiff": "TIFF", ".jp2": "JPEG2000", ".j2k": "JPEG2000", ".ppm": "PPM", ".pgm": "PPM", ".pbm": "PPM",
           ".pnm": "PPM"}[suffix]  # fmt: skip
    img = img.convert({".pgm": "L", ".pbm": "1"}.get(suffix, "RGB"))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"no_jp2": True} if suffix == ".j2k" else {}))
    return buf.getvalue()


def test_every_image_suffix_a_folder_lists_is_ingested(tmp_path):
    """`lvd folder-urls` lists a file for its suffix (`infra.images.IMAGE_SUFFIXES`); each such file, in the format its
    suffix names and with the suffix in upper case as cameras write it, is downloaded and stored at its size."""
    from infra.images import IMAGE_SUFFIXES

    root = tmp_path / "formats"
    root.mkdir()
    for i, suffix in enumerate(sorted(IMAGE_SUFFIXES)):
        (root / f"img{i:02d}{suffix.upper() if i % 2 else suffix}").write_bytes(_encode(i, suffix))
    urls = tmp_path / "urls.parquet"
    assert folder_url_list(root, urls).listed == len(IMAGE_SUFFIXES)
    stage = tmp_path / "run" / "stages" / "ingest"
    cfg = IngestConfig(local_roots=[root], shard_size=32, threads=2, encode_format="png", encode_quality=3,
                       min_image_size=8, phash_dedup=False)
    result = ingest(DataConfig(url_list=urls), stage, cfg, ShardTracker("ingest", stage))
    events = Ledger(tmp_path / "run").events()
    dropped = events[(events["kind"] != "info") & (events["reason"] != "downloaded")]
    assert dropped.empty, dropped[["url", "reason", "detail"]].to_string()
    assert result.counts["kept"] == len(IMAGE_SUFFIXES)
    table = pd.concat(pd.read_parquet(p) for p in sorted((stage / "shards").glob("*.parquet")))
    assert set(zip(table["original_width"], table["original_height"], strict=True)) == {(40, 24)}


def test_a_file_whose_name_is_not_utf8_is_read(tmp_path):
    """A name from an old archive or a Windows copy (`caf\\xe9.jpg`, Latin-1) is listed with its bytes escaped
    (`caf%E9.jpg`, as `Path.as_uri` writes it) and read through that URL; before, the escape was decoded as UTF-8
    (`caf\\ufffd.jpg`) and the file was recorded as file_missing."""
    import os

    root = tmp_path / "old"
    root.mkdir()
    (root / os.fsdecode(b"caf\xe9.jpg")).write_bytes(_image(1, fmt="JPEG"))
    (root / "naïve #1 100%.png").write_bytes(_image(2))
    urls = tmp_path / "urls.parquet"
    assert folder_url_list(root, urls).listed == 2
    assert sorted(pd.read_parquet(urls)["url"]) == [f"{root.as_uri()}/caf%E9.jpg",
                                                    f"{root.as_uri()}/na%C3%AFve%20%231%20100%25.png"]  # fmt: skip
    stage = tmp_path / "run" / "stages" / "ingest"
    cfg = IngestConfig(local_roots=[root], shard_size=8, threads=2, encode_format="png", encode_quality=3)
    assert ingest(DataConfig(url_list=urls), stage, cfg, ShardTracker("ingest", stage)).counts["kept"] == 2
    assert folder_url_list(root, urls).missing == 0  # listing it again: both files still there
