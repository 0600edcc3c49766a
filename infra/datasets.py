"""Readers for labelled image sets (seed sets, evaluation splits, users' own folders).

Formats:
- ``folder``: ``<root>/<class>/<image>`` (labels from sorted class folder names) or a flat folder (no labels);
- ``webdataset``: ``<root>/*.tar`` with ``<key>.<jpg|png|...>`` and optional ``<key>.cls`` or ``<key>.json``
  (``{"label": int}``), or a single ``.tar`` file;
- ``parquet``: a table (``.parquet`` or ``.csv``) with a ``path`` column (relative to the table's folder, or absolute)
  and optional ``label``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from infra.images import is_hidden, is_image_name
from infra.shards import iter_tar
from infra.storage import sha256_bytes


@dataclass(frozen=True)
class LabeledImage:
    image_id: str  # sha256 of the file bytes
    data: bytes
    label: int | None
    name: str  # file name or tar key, for humans


class DatasetError(ValueError):
    pass


def detect_format(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset path does not exist: {path}")
    if path.is_file():
        if path.suffix in (".parquet", ".csv"):
            return "parquet"
        if path.suffix == ".tar":
            return "webdataset"
        raise DatasetError(f"cannot tell the format of {path}: expected a folder, .tar, .parquet or .csv")
    if any(path.glob("*.tar")):
        return "webdataset"
    return "folder"


def _images(folder: Path) -> list[Path]:
    """The image files of a folder (not hidden ones: `._x.jpg` resource forks, `.DS_Store`), in name order."""
    return sorted(f for f in folder.iterdir() if f.is_file() and is_image_name(f.name) and not is_hidden(Path(f.name)))


def _iter_folder(root: Path) -> Iterator[LabeledImage]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(Path(p.name)))
    if classes:
        for label, cls in enumerate(classes):
            for f in _images(root / cls):
                data = f.read_bytes()
                yield LabeledImage(sha256_bytes(data), data, label, f"{cls}/{f.name}")
    else:
        for f in _images(root):
            data = f.read_bytes()
            yield LabeledImage(sha256_bytes(data), data, None, f.name)


def _iter_webdataset(root: Path) -> Iterator[LabeledImage]:
    tars = [root] if root.is_file() else sorted(root.glob("*.tar"))
    for tar in tars:
        pending: dict[str, dict[str, bytes]] = {}
        for key, ext, data in iter_tar(tar, sidecars=True):
            pending.setdefault(key, {})[ext.lower()] = data
        for key, parts in pending.items():
            image_ext = next((e for e in parts if is_image_name(f"x.{e}")), None)
            if is_hidden(Path(key)):
                continue
            if image_ext is None:
                continue
            label = None
            if "cls" in parts:
                label = int(parts["cls"].decode().strip())
            elif "json" in parts:
                label = json.loads(parts["json"]).get("label")
            data = parts[image_ext]
            yield LabeledImage(sha256_bytes(data), data, label, f"{tar.name}:{key}")


def _iter_parquet(path: Path) -> Iterator[LabeledImage]:
    table = pd.read_csv(path) if path.suffix == ".csv" else pq.read_table(path).to_pandas()
    if "path" not in table.columns:
        raise DatasetError(f"{path}: a parquet manifest needs a 'path' column (has {list(table.columns)})")
    has_label = "label" in table.columns
    for rec in table.itertuples(index=False):
        p = Path(rec.path)
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise DatasetError(f"{path}: listed image does not exist: {p}")
        data = p.read_bytes()
        label = int(rec.label) if has_label and rec.label is not None and not pd.isna(rec.label) else None
        yield LabeledImage(sha256_bytes(data), data, label, str(rec.path))


def iter_images(path: Path, fmt: str = "auto") -> Iterator[LabeledImage]:
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers = {"folder": _iter_folder, "webdataset": _iter_webdataset, "parquet": _iter_parquet}
    if fmt not in readers:
        raise DatasetError(f"unknown dataset format {fmt!r}; use one of {sorted(readers)}")
    if not path.exists():
        raise DatasetError(f"dataset path does not exist: {path}")
    yield from readers[fmt](path)
