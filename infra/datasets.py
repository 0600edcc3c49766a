"""Readers for labelled image sets (seed sets, evaluation splits, users' own folders).

Formats:
- ``folder``: ``<root>/<class>/<image>`` (labels from sorted class folder names) or a flat folder (no labels);
- ``webdataset``: ``<root>/*.tar`` with ``<key>.<jpg|png|...>`` and optional ``<key>.cls`` or ``<key>.json``
  (``{"label": int}``), or a single ``.tar`` file;
- ``parquet``: a table (``.parquet`` or ``.csv``) with a ``path`` column (relative to the table's folder, or absolute)
  and optional ``label``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from infra.errors import InputProblem
from infra.images import IMAGE_SUFFIXES, decode, image_files, is_hidden, is_image_name, normalize
from infra.shards import iter_tar
from infra.storage import sha256_bytes


@dataclass(frozen=True)
class LabeledImage:
    image_id: str  # sha256 of the file bytes
    data: bytes
    label: int | None
    name: str  # file name or tar key, for humans
    ext: str = ""  # the image's format as its file or member names it (`jpg`, `heic`), lower case, no dot


class DatasetError(ValueError, InputProblem):
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
        packed = "".join(path.suffixes[-2:]).lower()
        if packed.endswith((".zip", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".7z", ".rar")):
            raise DatasetError(f"{path} is an archive: unpack it into a folder first (images are read from a folder, "
                               "an uncompressed .tar, or a .parquet / .csv manifest)")
        raise DatasetError(f"cannot tell the format of {path}: expected a folder, .tar, .parquet or .csv")
    if any(path.glob("*.tar")):
        return "webdataset"
    return "folder"


def _shown(name: str) -> str:
    """A file name as text every writer takes: the bytes of a name that is not UTF-8 (`caf\xe9.jpg` from an old
    archive; Python holds them as surrogates, which parquet and JSON writers refuse) written as `\xe9` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _iter_folder(root: Path) -> Iterator[LabeledImage]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(Path(p.name)))
    if classes:
        for label, cls in enumerate(classes):
            for f in image_files(root / cls):  # sub-folders too, as ImageFolder (Tiny-ImageNet: <class>/images/)
                data = f.read_bytes()
                name = _shown(f"{cls}/{f.relative_to(root / cls).as_posix()}")
                yield LabeledImage(sha256_bytes(data), data, label, name, f.suffix[1:].lower())
    else:
        for f in image_files(root):
            data = f.read_bytes()
            yield LabeledImage(sha256_bytes(data), data, None, _shown(f.name), f.suffix[1:].lower())


def _iter_webdataset(root: Path) -> Iterator[LabeledImage]:
    tars = [root] if root.is_file() else sorted(root.glob("*.tar"))
    for tar in tars:
        try:  # a sample's members are consecutive (WebDataset's rule): one sample in memory at a time
            for key, members in itertools.groupby(iter_tar(tar, sidecars=True, nested=True), key=lambda m: m[0]):
                if (sample := _sample(tar, key, {ext.lower(): data for _, ext, data in members})) is not None:
                    yield sample
        except tarfile.TarError as err:
            raise DatasetError(f"{tar}: not a readable uncompressed tar ({err}); decompress a .tar.gz first "
                               "(gunzip -k), or copy a cut one again") from err


def _sample(tar: Path, key: str, parts: dict[str, bytes]) -> LabeledImage | None:
    image_ext = next((e for e in parts if is_image_name(f"x.{e}")), None)
    if image_ext is None:  # (hidden members are left out by iter_tar)
        return None
    label = None
    if "cls" in parts:
        label = int(parts["cls"].decode().strip())
    elif "json" in parts:
        label = json.loads(parts["json"]).get("label")
    data = parts[image_ext]
    return LabeledImage(sha256_bytes(data), data, label, _shown(f"{tar.name}:{key}"), image_ext.rsplit(".", 1)[-1])


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
        yield LabeledImage(sha256_bytes(data), data, label, str(rec.path), p.suffix[1:].lower())


def iter_images(path: Path, fmt: str = "auto") -> Iterator[LabeledImage]:
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers = {"folder": _iter_folder, "webdataset": _iter_webdataset, "parquet": _iter_parquet}
    if fmt not in readers:
        raise DatasetError(f"unknown dataset format {fmt!r}; use one of {sorted(readers)}")
    if not path.exists():
        raise DatasetError(f"dataset path does not exist: {path}")
    yield from readers[fmt](path)


@dataclass(frozen=True)
class SplitCheck:
    images: int
    classes: int  # distinct labels (0: none)
    problems: tuple[str, ...]  # each names the file and what is wrong


def _decodes(data: bytes) -> str | None:
    """None when the bytes decode as the stages decode them (`infra.images`); else why not. JPEGs are decoded at an
    eighth of their size: the whole compressed stream is still read (a file cut short fails), for a fifth of the
    time."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            normalize(img)
    except Exception as err:  # Pillow's many ways of saying "not this": each is the file's problem, none raised
        return f"{type(err).__name__}: {str(err).strip()[:200]}"
    return None


def check_split(path: Path, fmt: str = "auto", need_labels: bool = False) -> SplitCheck:
    """Read a set as the stages will (every image decoded): how many images and classes, and what would stop a stage
    (a file that does not decode, an image without a label where ``need_labels``, a set without images)."""
    problems: list[str] = []
    bad: list[str] = []
    unlabelled: list[str] = []
    labels: set[int] = set()
    n = 0
    try:
        for item in iter_images(Path(path), fmt):
            n += 1
            if (why := _decodes(item.data)) is not None:
                bad.append(f"{item.name} ({why})")
            if item.label is None:
                unlabelled.append(item.name)
            else:
                labels.add(int(item.label))
    except (DatasetError, OSError, ValueError, KeyError) as err:
        return SplitCheck(n, len(labels), (f"cannot be read: {err}",))
    if n == 0:
        problems.append(f"no images in {path} (image files: {' '.join(sorted(IMAGE_SUFFIXES))}; hidden files are left out)")
    if bad:
        problems.append(f"{len(bad)} of {n} images cannot be decoded: {', '.join(bad[:5])}"
                        + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") + "; remove or replace them")
    if need_labels and unlabelled and n:
        how = {"folder": "<split>/<class>/<image> (class sub-folders)", "webdataset": "a .cls or .json label beside "
               "each image", "parquet": "a label column"}.get(detect_format(Path(path)) if fmt == "auto" else fmt, "labels")
        problems.append(f"{len(unlabelled)} of {n} images have no class label (e.g. {unlabelled[0]}): a classification "
                        f"split needs {how}")  # fmt: skip
    return SplitCheck(n, len(labels), tuple(problems))


def split_fingerprint(path: Path) -> str | None:
    """What a set's images are, told from the file system alone (names, sizes, modification times), for remembering
    that a split passed :func:`check_split`; None where that cannot be told so (a parquet manifest points anywhere)."""
    path = Path(path).resolve()
    h = hashlib.sha256(str(path).encode())
    if path.is_file():
        if path.suffix != ".tar":
            return None
        files = [path]
    else:
        files = []
        for top, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not is_hidden(Path(d)))
            files += [Path(top) / n for n in sorted(names)]
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def decode_item(item: LabeledImage, where: str | Path, mode: str | None = "RGB") -> Image.Image:
    """`infra.images.decode` of a set's image; a file that does not decode (changed since the run's start-up check)
    stops the stage with an error naming the set and the file, not Pillow's bare message."""
    try:
        return decode(item.data, mode)
    except Exception as err:  # Pillow's many ways of saying "not this"
        raise DatasetError(f"{where}: {item.name} cannot be decoded ({type(err).__name__}: {err}); remove or replace "
                           "it") from err
