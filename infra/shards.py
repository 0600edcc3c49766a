"""Image shards: WebDataset-compatible tars plus a parquet sample table per shard.

A shard ``<name>`` of a stage is ``shards/<name>.tar`` (members ``<image_id>.<ext>``, in table order) and
``shards/<name>.parquet`` (one row per image: ``image_id``, ``row_id``, ``source``, ``ext``, ``sha256`` of the
stored bytes, ``width``, ``height`` and stage columns); a member ``<image_id>.json`` beside an image holds that sample's metadata
(the corpus writes one per image, as img2dataset and WebDataset readers expect). Tars are written deterministically (fixed mtime, owner
and mode) so a rerun produces byte-identical shards. Both files are written atomically.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from infra.errors import InputProblem
from infra.images import is_hidden
from infra.storage import atomic_path, commit, sha256_bytes, temp_for


class UnsafeArchiveError(ValueError, InputProblem):
    pass


SIDECAR = "json"  # the extension of a sample's metadata member


def shard_name(index: int) -> str:
    return f"{index:05d}"


@dataclass(frozen=True)
class Shard:
    tar: Path
    table: Path

    @property
    def name(self) -> str:
        return self.tar.stem

    def read_table(self, columns: list[str] | None = None) -> pd.DataFrame:
        return pq.read_table(self.table, columns=columns).to_pandas()

    def __iter__(self) -> Iterator[tuple[str, str, bytes]]:
        return iter_tar(self.tar)


def list_shards(shard_dir: Path) -> list[Shard]:
    shard_dir = Path(shard_dir)
    return [Shard(t, t.with_suffix(".parquet")) for t in sorted(shard_dir.glob("*.tar")) if t.with_suffix(".parquet").is_file()]


def check_member_name(name: str, nested: bool = False, source: Path | None = None) -> None:
    """Refuse absolute paths, parent references and, unless `nested`, nested paths (tar-slip; nested names are safe
    only where members are never extracted, e.g. read by offset). `source` names the tar in the error."""
    if name.startswith(("/", "\\")) or ".." in Path(name).parts or (not nested and ("/" in name or "\\" in name)):
        where = f"{source}: " if source is not None else ""
        raise UnsafeArchiveError(f"{where}unsafe tar member name {name!r}")


def iter_tar(path: Path, sidecars: bool = False, nested: bool = False) -> Iterator[tuple[str, str, bytes]]:
    """Yield (key, ext, bytes) for regular members; links, devices and unsafe names are refused. A sample's metadata
    (``<key>.json``, WebDataset style) is skipped unless ``sidecars``: the images of a shard are its other members.
    ``nested`` (a user's tar, read and never extracted): member names may hold folders (``train/n014/x.JPEG``, key
    ``train/n014/x`` as WebDataset splits it: at the first dot of the file name) and folder members are skipped."""
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            check_member_name(member.name, nested=nested, source=Path(path))
            if nested and (member.isdir() or is_hidden(PurePath(member.name))):  # (`._x.jpg`: macOS's, not images)
                continue
            if not member.isfile():
                raise UnsafeArchiveError(f"{path}: member {member.name!r} is not a regular file")
            folder, _, name = member.name.rpartition("/") if nested else ("", "", member.name)
            key, _, ext = name.partition(".")
            key = f"{folder}/{key}" if folder else key
            if ext == SIDECAR and not sidecars:
                continue
            f = tar.extractfile(member)
            assert f is not None
            yield key, ext, f.read()


class ShardWriter:
    """Write one shard: images stream into a temporary tar; tar and table are renamed into place on close."""

    def __init__(self, shard_dir: Path, name: str):
        self.tar_path = Path(shard_dir) / f"{name}.tar"
        self.table_path = Path(shard_dir) / f"{name}.parquet"
        self.rows: list[dict[str, Any]] = []
        self._tmp = temp_for(self.tar_path)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed by commit/abort)

    def add(self, image_id: str, data: bytes, ext: str, meta: dict[str, Any] | None = None, **columns: Any) -> None:
        """One image; with ``meta``, also its ``<image_id>.json`` member right after it (a WebDataset sample)."""
        assert ext != SIDECAR, "json is the metadata member of a sample"
        self._member(f"{image_id}.{ext}", data)
        if meta is not None:
            self._member(f"{image_id}.{SIDECAR}", json.dumps(meta, sort_keys=True, default=str).encode())
        self.rows.append({"image_id": image_id, "ext": ext, "sha256": sha256_bytes(data), "bytes": len(data), **columns})

    def _member(self, name: str, data: bytes) -> None:
        check_member_name(name)
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def close(self, schema: pa.Schema | None = None) -> Shard:
        """Finish the tar, then the table: a shard is readable only once both exist."""
        self._tar.close()
        commit(self._tmp, self.tar_path)
        if self.rows:
            table = pa.Table.from_pylist(self.rows, schema=schema)
        else:
            table = (schema or pa.schema([("image_id", pa.string())])).empty_table()
        with atomic_path(self.table_path) as tmp:
            pq.write_table(table, tmp)
        return Shard(self.tar_path, self.table_path)

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_shard_images(shard: Shard, skip: set[str] | None = None) -> Iterator[tuple[dict, bytes]]:
    """Yield (table row as dict, stored bytes) in table order, skipping image ids in ``skip``."""
    table = shard.read_table()
    if table["image_id"].is_unique:  # one conversion for the shard: a row lookup per image cost 0.3-0.5 ms in pandas
        rows = dict(zip(table["image_id"], table.to_dict("records"), strict=True))
        row = rows.__getitem__
    else:
        indexed = table.set_index("image_id", drop=False)
        row = lambda key: indexed.loc[key].to_dict()  # noqa: E731
    for key, _ext, data in shard:
        if skip and key in skip:
            continue
        yield row(key), data
