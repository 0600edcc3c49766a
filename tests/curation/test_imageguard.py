"""Image modes img2dataset's OpenCV decoder gets wrong are converted by fixed rules, down to the pixel.

Each case is checked on :func:`normalize`, on the bytes :func:`prepare` hands to OpenCV, and through the guarded
img2dataset resizer to the stored (png) image. The ingest run of the bad-input crawl covers EXIF orientation,
16-bit grey, alpha, animation and CMYK (tests/curation/test_ingest_bad_inputs.py).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from curation.imageguard import guarded_resizer, normalize, prepare, prepare_scaled
from infra.config.ingest import IngestConfig


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _palette() -> bytes:
    img = Image.new("P", (3, 2))
    img.putpalette([10, 20, 30, 200, 100, 0, 255, 255, 255] + [0, 0, 0] * 253)
    img.putdata([0, 1, 2, 2, 1, 0])
    return _png(img)


def _one_bit() -> bytes:
    img = Image.new("1", (4, 2))
    img.putdata([0, 1, 1, 0, 1, 0, 0, 1])  # Pillow stores 1 as 255
    return _png(img)


RGB16 = np.array([[[0x1234, 0xABCD, 0xFF00], [0x00FF, 0x8000, 0x7FFF]],
                  [[0xFFFF, 0x0000, 0x0100], [0x01FF, 0xFE01, 0x5A5A]]], np.uint16)  # fmt: skip


def _rgb16() -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(RGB16[..., ::-1]))  # OpenCV writes BGR, 16 bits a sample
    assert ok
    return buf.tobytes()


CASES = {
    # palette without transparency -> RGB: each index becomes its palette colour
    "palette": (_palette, "RGB", [[[10, 20, 30], [200, 100, 0], [255, 255, 255]],
                                  [[255, 255, 255], [200, 100, 0], [10, 20, 30]]]),
    # 1-bit -> grey 0 or 255
    "one_bit": (_one_bit, "L", [[0, 255, 255, 0], [255, 0, 0, 255]]),
    # 16-bit RGB -> 8-bit RGB, the top byte of every sample (0x7FFF -> 0x7F, not rounded up)
    "rgb16": (_rgb16, "RGB", [[[0x12, 0xAB, 0xFF], [0x00, 0x80, 0x7F]], [[0xFF, 0x00, 0x01], [0x01, 0xFE, 0x5A]]]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_normalize_gives_exact_pixels(case):
    make, mode, expected = CASES[case]
    out = normalize(Image.open(io.BytesIO(make())))
    assert out.mode == mode
    assert np.asarray(out).tolist() == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepare_hands_opencv_the_normalized_image(case):
    """None of these is plain 8-bit RGB/grey: OpenCV gets a lossless PPM/PGM of the normalized image."""
    make, mode, expected = CASES[case]
    data, why = prepare(make(), max_pixels=100)
    assert why is None and data[:2] == (b"P6" if mode == "RGB" else b"P5")
    assert np.asarray(Image.open(io.BytesIO(data))).tolist() == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_stored_image_is_8_bit_with_exact_pixels(case):
    make, mode, expected = CASES[case]
    resizer = guarded_resizer(IngestConfig(encode_format="png", encode_quality=1, resize_mode="no"))
    encoded, width, height, original_width, original_height, error = resizer(io.BytesIO(make()))
    assert error is None and (width, height) == (original_width, original_height) == (len(expected[0]), len(expected))
    stored = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint8
    assert (stored[..., ::-1] if mode == "RGB" else stored).tolist() == expected


def test_a_png_with_a_damaged_chunk_is_refused_before_libpng_prints_on_stderr(capfd):
    """libpng (inside OpenCV) refuses a damaged IDAT too, but prints `libpng error: ...` on the process's stderr on the
    way (Pillow reads only the chunks before it); the chunk checksums (`integrity`) refuse it first, with a message the
    ledger keeps."""
    from infra.demo.crawl import _pattern, corrupt_png
    from infra.demo.crawl import _png as demo_png

    assert prepare(corrupt_png(_pattern(48, 48, 20)), 10**8) == (
        None, "decode error: png 'IDAT' chunk checksum mismatch")
    good = demo_png(_pattern(48, 48, 20)) + b"trailing bytes after IEND"  # (never decoded: not checked)
    assert prepare(good, 10**8) == (good, None)
    text = _png(Image.new("RGB", (8, 8), (1, 2, 3))).replace(b"IEND", b"")[:-8]  # cut before IEND: the same data
    after = text + _chunk(b"tEXt", b"comment\x00hello", damaged=True) + _chunk(b"IEND", b"")
    assert prepare(after, 10**8) == (None, "decode error: png 'tEXt' chunk checksum mismatch")
    assert capfd.readouterr().err == ""


def _chunk(kind: bytes, body: bytes, damaged: bool = False) -> bytes:
    import zlib

    crc = zlib.crc32(kind + body) ^ (1 if damaged else 0)
    return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")


def test_a_large_jpeg_is_decoded_smaller_with_the_same_size_recorded_and_nearly_the_same_pixels():
    """A photograph img2dataset shrinks at least fourfold is decoded by libjpeg at 1/2-1/8 scale: the stored image
    has the size of a full decode's (img2dataset rounds the other side from the size it decodes), `original_width/height` stay the photograph's own (transposed where its EXIF
    says so), and the pixels are within a grey level or two of resizing the full decode."""
    from img2dataset.resizer import Resizer
    from skimage import data

    big = cv2.resize(data.astronaut(), (2000, 1500), interpolation=cv2.INTER_CUBIC)
    cfg = IngestConfig(image_size=128, encode_format="png", encode_quality=3)
    plain = Resizer(image_size=128, resize_mode="keep_ratio", resize_only_if_bigger=False, encode_format="png",
                    encode_quality=3)  # fmt: skip
    for turned in (False, True):
        img = Image.fromarray(big)
        exif = img.getexif()
        if turned:
            exif[0x0112] = 6
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92, exif=exif)
        jpg = buf.getvalue()
        ppm, why, full = prepare_scaled(jpg, 10**9, cfg)
        assert why is None and full == ((1500, 2000) if turned else (2000, 1500))
        # decoded at 1/4 (500 x 375: still >= 2 x 128) and brought to the size img2dataset computes from the full one
        assert Image.open(io.BytesIO(ppm)).size == ((128, 171) if turned else (171, 128))
        encoded, w, h, ow, oh, err = guarded_resizer(cfg)(io.BytesIO(jpg))
        assert err is None and (ow, oh) == full and (w, h) == ((128, 171) if turned else (171, 128))
        if not turned:  # img2dataset alone, from the full decode (it ignores EXIF, hence the upright case only)
            ref, *_ = plain(io.BytesIO(jpg))
            a = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED).astype(int)
            b = cv2.imdecode(np.frombuffer(ref, np.uint8), cv2.IMREAD_UNCHANGED).astype(int)
            assert a.shape == b.shape and np.abs(a - b).mean() < 0.5, np.abs(a - b).mean()
    small = IngestConfig(image_size=400, encode_format="png", encode_quality=3)  # shrunk less than fourfold
    assert prepare_scaled(jpg, 10**9, small)[2] is None


def test_a_shards_images_are_resized_in_its_download_threads_with_the_loops_results(tmp_path, monkeypatch):
    """img2dataset resizes a shard's images in one loop; each download thread now computes its image's result, once,
    and the loop takes it: every stored image, size and refusal is what the resizer gives for those bytes."""
    import threading

    import img2dataset.downloader
    import pandas as pd
    from skimage import data

    import curation.imageguard as imageguard
    import curation.ingest as ingest

    pool = tmp_path / "pool"
    pool.mkdir()
    for i, photo in enumerate([data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]):
        img = Image.fromarray(cv2.resize(photo, (1600, 1200), interpolation=cv2.INTER_CUBIC))  # decoded at 1/4
        exif = img.getexif()
        if i == 1:
            exif[0x0112] = 6
        img.save(pool / f"p{i}.jpg", "JPEG", quality=90, exif=exif)
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21).save(pool / "grey16.png")
    (pool / "cut.jpg").write_bytes((pool / "p0.jpg").read_bytes()[:20_000])
    (pool / "page.jpg").write_bytes(b"<!doctype html><html><body>moved</body></html>")
    files = sorted(pool.iterdir())
    cfg = IngestConfig(local_roots=[pool], image_size=128, encode_format="png", encode_quality=3, threads=4)
    in_main: list[bool] = []
    real = ingest.guarded_resizer

    def recording(c: IngestConfig):
        resizer = real(c)
        compute = resizer.compute

        def spy(raw, bbox=None):
            in_main.append(threading.current_thread() is threading.main_thread())
            return compute(raw, bbox)

        resizer.compute = spy
        return resizer

    monkeypatch.setattr(ingest, "guarded_resizer", recording)
    original = img2dataset.downloader.download_image_with_retry
    rows = pd.DataFrame({"row_id": range(len(files)), "source": "s", "caption": None,
                         "url": [f.as_uri() for f in files]})  # fmt: skip
    meta, images = ingest.run_img2dataset(rows, tmp_path / "work", cfg)
    assert in_main == [False] * len(files)  # once per image, none in the shard's loop
    assert img2dataset.downloader.download_image_with_retry is original and not imageguard._RESIZING["resizers"]
    reference = real(cfg)
    outcomes = {}
    for r in meta.itertuples():
        img, w, h, ow, oh, err = reference.compute(files[r.row_id].read_bytes())
        assert r.error_message == err, files[r.row_id].name
        if err is None:
            assert (images[r.key], r.width, r.height, r.original_width, r.original_height) == (img, w, h, ow, oh)
        outcomes[files[r.row_id].name] = err
    assert outcomes == {"cut.jpg": "truncated image: jpeg without end-of-image marker", "grey16.png": None,
                        "p0.jpg": None, "p1.jpg": None, "p2.jpg": None, "p3.jpg": None,
                        "page.jpg": "not an image: an html document"}  # fmt: skip
