"""The three dataset formats of evaluation sets hold the same images and labels: the same dataset digest."""

import io
import tarfile

import pandas as pd

from evaluation.features import read_image_set


def test_folder_webdataset_parquet_and_csv_give_the_same_dataset(toy_classification, tmp_path):
    folder = toy_classification[1]
    files = sorted((p for p in folder.glob("*/*.png")), key=lambda p: (p.parent.name, p.name))
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i, f in enumerate(files):
            for name, data in ((f"{i:04d}.png", f.read_bytes()), (f"{i:04d}.cls", f.parent.name.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = pd.DataFrame({"path": [str(f.relative_to(folder.parent)) for f in files],
                             "label": [int(f.parent.name) for f in files]})
    manifest.to_parquet(folder.parent / "test.parquet")
    manifest.to_csv(folder.parent / "test.csv", index=False)
    sets = {fmt: read_image_set(path) for fmt, path in (("folder", folder), ("webdataset", tmp_path),
                                                         ("parquet", folder.parent / "test.parquet"),
                                                         ("csv", folder.parent / "test.csv"))}
    ref = sets["folder"]
    assert len(ref) == 12 and ref.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for fmt, s in sets.items():
        assert s.ids == ref.ids and s.labels.tolist() == ref.labels.tolist(), fmt
        assert s.digest == ref.digest, fmt
