import io
import tarfile

import pytest

from infra.shards import ShardWriter, UnsafeArchiveError, iter_tar, list_shards


def _write(d):
    with ShardWriter(d, "00000") as w:
        w.add("b" * 64, b"\x01\x02", "jpg", row_id=7)
        w.add("a" * 64, b"\x03", "png", row_id=3)
    return list_shards(d)[0]


def test_roundtrip_in_order_with_table(tmp_path):
    shard = _write(tmp_path)
    assert list(shard) == [("b" * 64, "jpg", b"\x01\x02"), ("a" * 64, "png", b"\x03")]
    t = shard.read_table()
    assert t["image_id"].tolist() == ["b" * 64, "a" * 64]
    assert t["row_id"].tolist() == [7, 3]
    assert t["sha256"].tolist() == [
        "a12871fee210fb8619291eaea194581cbd2531e4b23759d225f6806923f63222",
        "084fed08b978af4d7d196a7446a86b58009e636b611db16211b65a9aadff29c5",
    ]


def test_rewrite_is_byte_identical(tmp_path):
    a = _write(tmp_path / "a").tar.read_bytes()
    b = _write(tmp_path / "b").tar.read_bytes()
    assert a == b


def test_aborted_shard_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "00000") as w:
        w.add("c" * 64, b"x", "jpg")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/passwd", "a/b.jpg"])
def test_unsafe_member_names_are_refused(tmp_path, name):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UnsafeArchiveError):
        list(iter_tar(path))


def test_links_are_refused(tmp_path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("x.jpg")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(UnsafeArchiveError):
        list(iter_tar(path))


def test_shard_rows_come_with_the_tables_values_and_types(tmp_path):
    """iter_shard_images converts the table once per shard: each row is what a per-image pandas lookup gives (the
    same keys, values, Python types and missing values)."""
    import math

    from infra.shards import iter_shard_images

    w = ShardWriter(tmp_path, "00000")
    for i in range(4):
        w.add(f"{i:064x}", b"x" * (i + 1), "jpg", row_id=i, url=f"http://h/{i}", width=10 + i,
              original_width=None if i == 2 else 30, phash=(-1) ** i * (2**62 + i), face_boxes=None if i % 2 else "[]")  # fmt: skip
    shard = w.close()
    lookup = shard.read_table().set_index("image_id", drop=False)
    rows = [meta for meta, _ in iter_shard_images(shard, skip={f"{1:064x}"})]
    assert [r["row_id"] for r in rows] == [0, 2, 3]
    for meta in rows:
        ref = lookup.loc[meta["image_id"]].to_dict()
        assert list(meta) == list(ref)
        for k, v in ref.items():
            assert type(meta[k]) is type(v) and (meta[k] == v or (isinstance(v, float) and math.isnan(v))), k
