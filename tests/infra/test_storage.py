import pytest

from infra.storage import Markers, atomic_path, atomic_write_text, read_json


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_failed_write_keeps_previous_content_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_markers(tmp_path):
    m = Markers(tmp_path)
    assert m.done() == [] and not m.is_done("00001")
    m.mark("00001", {"kept": 3})
    m.mark("00000")
    assert m.done() == ["00000", "00001"]
    assert read_json(m.path("00001")) == {"kept": 3}
    m.clear("00001")
    assert m.done() == ["00000"]
