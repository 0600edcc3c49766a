"""Atomic writes and completion markers: a half-written file is never visible under its final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_for(path: Path | str) -> Path:
    """A new empty temporary file beside ``path`` (same directory, so the final rename is atomic), created with the
    mode a plain `open` gives (0666 less the umask: 0644 under the usual 022). `tempfile.mkstemp` makes 0600 files,
    and every run file kept that mode whatever the umask: a shared runs folder or a web server showing reports got
    "permission denied"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # (a name taken by a concurrent writer: draw another)
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def commit(tmp: Path, path: Path | str, fsync: bool = True) -> None:
    """Move a finished temporary file onto ``path``: fsync the data, rename, fsync the directory."""
    path = Path(path)
    if fsync:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: Path | str, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (fsync'ed first).

    On any error the temporary file is removed and ``path`` keeps its previous content.
    """
    tmp = temp_for(path)
    mode = tmp.stat().st_mode & 0o777  # what the umask gives
    try:
        yield tmp
        if tmp.stat().st_mode & 0o777 != mode:  # a writer that replaced the file with its own (safetensors: 0600)
            os.chmod(tmp, mode)
        commit(tmp, path, fsync=fsync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb", fsync: bool = True) -> Iterator[BinaryIO]:
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, mode) as f:
        yield f  # type: ignore[misc]


def atomic_write_bytes(path: Path | str, data: bytes, fsync: bool = True) -> None:
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: Path | str, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), fsync=fsync)


def atomic_write_json(path: Path | str, obj: Any, fsync: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", fsync=fsync)


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


FINGERPRINT_BYTES = 1 << 20


def files_fingerprint(paths: Iterable[Path | str | None]) -> str:
    """A cheap digest of the contents of files a stage reads from outside the run (URL lists, model weights): per
    path in order, its name, size and the sha256 of its first and last MiB; a folder's files are taken sorted;
    "none" / "missing" stand for an unset / absent path. An edited, appended or replaced file changes it; a copy
    elsewhere (new mtimes) does not; it reads at most 2 MiB per file at any size."""
    h = hashlib.sha256()
    for path in paths:
        if path is None or not Path(path).exists():
            h.update(b"none;" if path is None else b"missing;")
            continue
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.relative_to(path) if f != path else f.name}:{size}:".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(FINGERPRINT_BYTES))
                if size > FINGERPRINT_BYTES:
                    fh.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                    h.update(fh.read())
        h.update(b";")
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_record(path: Path, root: Path) -> dict[str, Any]:
    """What a manifest says of an output file: its path relative to the run, size and sha256."""
    return {"path": str(path.relative_to(root)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


class Markers:
    """Per-shard completion markers of a stage: ``<stage>/_done/<shard>.json``, written last, atomically.

    A shard counts as done only when its marker exists; everything without a marker is redone and overwritten.
    """

    def __init__(self, stage_dir: Path):
        self.dir = Path(stage_dir) / "_done"

    def path(self, shard: str) -> Path:
        return self.dir / f"{shard}.json"

    def is_done(self, shard: str) -> bool:
        return self.path(shard).is_file()

    def mark(self, shard: str, info: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.path(shard), info or {})

    def read(self, shard: str) -> dict[str, Any]:
        return read_json(self.path(shard))

    def done(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json"))

    def clear(self, shard: str) -> None:
        self.path(shard).unlink(missing_ok=True)
