import os
import shutil

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


def test_files_fingerprint_follows_contents_not_copies(tmp_path):
    from infra.storage import files_fingerprint

    w = tmp_path / "weights.pt"
    w.write_bytes(bytes(range(256)) * 20_000)  # 5 MB: head and tail MiB read
    first = files_fingerprint([w])
    copy = tmp_path / "copy" / "weights.pt"
    copy.parent.mkdir()
    shutil.copyfile(w, copy)
    os.utime(copy, (1, 1))
    assert files_fingerprint([copy]) == first
    data = bytearray(w.read_bytes())
    data[10] ^= 1  # replaced by other weights of the same size
    w.write_bytes(bytes(data))
    assert files_fingerprint([w]) != first
    assert len({files_fingerprint([None]), files_fingerprint([tmp_path / "gone"]), files_fingerprint([]),
                files_fingerprint([copy])}) == 4
    assert files_fingerprint([copy.parent]) == files_fingerprint([copy])  # a folder of one file: that file
    (copy.parent / "extra.bin").write_bytes(b"x")  # a folder: every file counts
    assert files_fingerprint([copy.parent]) != files_fingerprint([copy])


def test_stages_fingerprint_the_model_files_they_read(tmp_path):
    """Each stage's key covers the external files its config names, so a file replaced in place makes it stale."""
    from flows.stages import SPECS
    from infra.config import load_config

    f = tmp_path / "model.bin"
    f.write_bytes(b"one")
    cfg = load_config(None, [f"nsfw.encoder_path={f}", f"nsfw.head_path={f}", f"faces.model_path={f}",
                             f"dedup.descriptor.path={f}", f"embed.backbone.path={f}"])
    cfg.evaluate.models = [{"name": "m", "backbone": {"kind": "vit", "path": f}}]
    cfg = type(cfg).model_validate(cfg.model_dump())
    stages = ["nsfw", "faces", "dedup", "embed", "evaluate"]
    before = {s: SPECS[s].external(cfg) for s in stages}
    f.write_bytes(b"two")
    after = {s: SPECS[s].external(cfg) for s in stages}
    assert [s for s in stages if before[s] != after[s]] == stages
    assert SPECS["retrieve"].external is None and SPECS["corpus"].external is None  # they read only the run


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_run_files_honour_the_umask(tmp_path, umask):
    """Every writer of run files gives the mode a plain `open` would (0666 less the umask), not mkstemp's 0600."""
    import torch
    from safetensors.torch import save_file

    from infra.run import RunDir
    from infra.shards import ShardWriter
    from infra.storage import atomic_write_json

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        atomic_write_json(tmp_path / "run.json", {})
        Markers(tmp_path / "stages" / "ingest").mark("00000", {"kept": 1})
        RunDir(tmp_path, "r").log_event("flow_started")
        with atomic_path(tmp_path / "teacher_backbone.safetensors") as tmp:  # safetensors writes a file of its own
            save_file({"w": torch.zeros(2)}, str(tmp))
        shard = ShardWriter(tmp_path / "shards", "00000")
        shard.add("ab" * 32, b"bytes", "jpg")
        shard.close()
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*") if p.is_file()}
    assert modes == {name: oct(0o666 & ~umask) for name in ("config.yaml", "run.json", "stages/ingest/_done/00000.json",
                                                            "r/events.jsonl", "shards/00000.tar", "shards/00000.parquet",
                                                            "teacher_backbone.safetensors")}
