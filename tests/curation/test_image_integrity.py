"""Corrupt or missing compressed data is refused in every decode path alike.

Generated corruptions of a real photograph (scikit-image's astronaut): JPEGs truncated at several points in their
scan data, with and without an end-of-image marker appended; a damaged Huffman table; bit flips and damaged runs
anywhere in the scan; PNGs with a bad IDAT checksum, with their zlib stream cut short (checksums fixed up), with
corrupt deflate data. The decode paths, through img2dataset's resizer
behind the guard (what ingest runs): OpenCV's for plain JPEG/PNG files, Pillow's for EXIF-rotated, CMYK, 16-bit and
palette files; the same scan behind an EXIF rotation takes Pillow's path.
"""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
import skimage.data
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from curation.imageguard import guarded_resizer
from curation.ingest import download_reason
from infra.config.ingest import IngestConfig

PHOTO = Image.fromarray(skimage.data.astronaut()).resize((160, 160))


def _jpeg(img: Image.Image = PHOTO, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _rotated(img: Image.Image = PHOTO) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(img, exif=exif.tobytes())


FILES = {"baseline": _jpeg(), "grey": _jpeg(PHOTO.convert("L")), "progressive": _jpeg(progressive=True),
         "exif_rotated": _rotated(), "cmyk": _jpeg(PHOTO.convert("CMYK"))}  # fmt: skip


def _scan(data: bytes) -> tuple[int, int]:
    """(first byte of the last scan's entropy-coded data, position of the end-of-image marker)."""
    sos = data.rfind(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0], data.rfind(b"\xff\xd9")


RESIZER = guarded_resizer(IngestConfig(encode_format="png", encode_quality=1, resize_mode="no"))


def _decoded(data: bytes) -> tuple[str, np.ndarray | None]:
    """What img2dataset's resizer (behind the guard) makes of the bytes: ('ok', the stored pixels), or
    ('truncated' / 'corrupt', None) by the reason ingest would record."""
    img, *_sizes, why = RESIZER(io.BytesIO(data))
    if why is not None:
        return {"truncated_image": "truncated", "decode_error": "corrupt"}.get(
            download_reason("failed_to_resize", why), why), None
    return "ok", cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("marker", [False, True])
def test_truncated_scan_data_is_refused(name, cut, marker):
    """The defect: cut in the scan with an end-of-image marker appended, OpenCV filled the rest with grey."""
    data = FILES[name]
    start, end = _scan(data)
    cut_data = data[: start + int((end - start) * cut)] + (b"\xff\xd9" if marker else b"")
    assert _decoded(cut_data)[0] == "truncated"


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_damaged_huffman_table_is_refused(name):
    data = bytearray(FILES[name])
    dht = data.find(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16  # code-length counts that no table can have
    assert _decoded(bytes(data))[0] == "corrupt"


DAMAGE = {"bit": lambda b, k: bytes([b[0] ^ (1 << k)]) + b[1:], "xor": lambda b, k: bytes(x ^ 0xA5 for x in b),
          "ones": lambda b, k: b"\xff\x00" * (len(b) // 2) + b[: len(b) % 2]}  # fmt: skip


@settings(max_examples=80, derandomize=True, database=None, deadline=None)
@given(where=st.floats(0, 1, exclude_max=True), size=st.integers(1, 8), how=st.sampled_from(sorted(DAMAGE)),
       k=st.integers(0, 7))  # fmt: skip
def test_damaged_scans_take_every_path_alike(where, size, how, k):
    """Damage inside the scan (a flipped bit, a run of bytes, a run of one-bits no Huffman code has) is refused
    when it breaks the stream, and cannot be seen when it does not (a JPEG has no checksum: about 3 in 4 single-bit
    flips decode to another valid image, and libjpeg-turbo zeroes some invalid codes without a warning); either way
    the fast path and Pillow's path (the same scan behind an EXIF rotation) decide alike, down to the pixels."""
    base, rotated = bytearray(FILES["baseline"]), bytearray(FILES["exif_rotated"])
    start, end = _scan(bytes(base))
    r_start, r_end = _scan(bytes(rotated))
    assert rotated[r_start:r_end] == base[start:end]  # the same entropy-coded data in both files
    at = start + int((end - start - size) * where)
    damaged = DAMAGE[how](bytes(base[at : at + size]), k)
    base[at : at + size] = damaged
    rotated[r_start + at - start : r_start + at - start + size] = damaged
    fast, pixels = _decoded(bytes(base))
    slow, rotated_pixels = _decoded(bytes(rotated))
    assert slow == fast
    if fast == "ok":
        np.testing.assert_array_equal(np.rot90(rotated_pixels, 1), pixels)


def _png_bytes(img: Image.Image = PHOTO, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _rebuild(data: bytes, idat: bytes) -> bytes:
    """The PNG with its IDAT data replaced (checksums correct)."""
    head = data[: data.find(b"IDAT") - 4]
    return head + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _idat(data: bytes) -> bytes:
    i = data.find(b"IDAT")
    return data[i + 4 : i + 4 + struct.unpack(">I", data[i - 4 : i])[0]]


PNGS = {"rgb8": _png_bytes(), "grey16": _png_bytes(Image.fromarray(np.asarray(PHOTO.convert("L"), np.uint16) * 257)),
        "palette": _png_bytes(PHOTO.convert("P"))}  # fmt: skip (the fast path, then two of Pillow's)


@pytest.mark.parametrize("name", sorted(PNGS))
def test_png_checksums_and_streams_are_verified_in_every_path(name):
    """A bad IDAT checksum (data intact): OpenCV's libpng refused it, Pillow did not; now both paths refuse it."""
    data = PNGS[name]
    assert _decoded(data)[0] == "ok"
    i = data.find(b"IDAT") + 4 + len(_idat(data))
    bad_crc = data[:i] + bytes(b ^ 0xFF for b in data[i : i + 4]) + data[i + 4 :]
    assert _decoded(bad_crc)[0] == "corrupt"
    idat = _idat(data)
    assert _decoded(_rebuild(data, idat[: len(idat) // 2]))[0] == "truncated"  # stream cut, checksums fixed up
    raw = zlib.decompress(idat)
    assert _decoded(_rebuild(data, zlib.compress(raw[: len(raw) // 2])))[0] == "truncated"  # a short, whole stream
    corrupt = bytearray(idat)
    corrupt[10:30] = bytes(b ^ 0x5A for b in corrupt[10:30])
    assert _decoded(_rebuild(data, bytes(corrupt)))[0] in ("corrupt", "truncated")


def test_intact_images_decode_as_before():
    """The strict JPEG decode is libjpeg-turbo, as OpenCV's: the same pixels as OpenCV's own decode."""
    for name in ("baseline", "grey"):
        status, pixels = _decoded(FILES[name])
        opencv = cv2.imdecode(np.frombuffer(FILES[name], np.uint8), cv2.IMREAD_UNCHANGED)
        assert status == "ok"
        assert np.abs(pixels.astype(int) - opencv.astype(int)).max() <= 1
