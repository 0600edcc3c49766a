"""Image sources for pretraining: corpus shards (`.tar`, WebDataset layout) and plain image folders.

A source is an indexable list of encoded images; decoding happens in the data stream. Tar shards are indexed once
(member offsets) and read by seeking, so random access does not unpack anything (and nothing is ever extracted:
member names may be nested, `train/n01440764/x.JPEG`, as in users' own tars; directory members are skipped; links,
devices, absolute names and `..` are still refused). Compressed or truncated tars get an error naming the file.
Folders are walked recursively for image files of any common extension, which is how users point training at their
own data.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Protocol

from PIL import Image, UnidentifiedImageError

from infra.images import IMAGE_SUFFIXES, decode, image_files, is_hidden, is_image_name
from infra.shards import UnsafeArchiveError, check_member_name


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def read(self, index: int) -> bytes: ...

    def name(self, index: int) -> str: ...


@dataclass
class FolderSource:
    files: list[Path]

    @classmethod
    def from_root(cls, root: Path) -> FolderSource:
        return cls(image_files(Path(root)))

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> bytes:
        return self.files[index].read_bytes()

    def name(self, index: int) -> str:
        return str(self.files[index])


@dataclass
class TarShardSource:
    tars: list[Path]
    # (tar index, data offset, size, member name) per image member, in shard order
    entries: list[tuple[int, int, int, str]] = field(default_factory=list)
    _handles: dict[int, object] = field(default_factory=dict, repr=False)
    _pid: int = field(default=-1, repr=False)

    @classmethod
    def from_tars(cls, tars: Sequence[Path]) -> TarShardSource:
        entries = []
        for t, path in enumerate(tars):
            size = Path(path).stat().st_size
            try:
                with tarfile.open(path, "r:") as tar:
                    for member in tar:
                        if member.isdir():
                            continue
                        _check_indexed_member(path, member)
                        if member.offset_data + member.size > size:
                            raise tarfile.ReadError(f"member {member.name!r} runs past the end of the file")
                        if is_image_name(member.name) and not is_hidden(PurePath(member.name)):
                            entries.append((t, member.offset_data, member.size, member.name))
            except tarfile.ReadError as err:  # compressed (offsets need a plain tar), truncated or not a tar
                raise ValueError(f"{path}: not a readable uncompressed tar ({err}); training reads shards by offset, "
                                 "so decompress .tar.gz / .tgz shards first (`gunzip -k`)") from err
        return cls([Path(p) for p in tars], entries)

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, index: int) -> bytes:
        if self._pid != os.getpid():  # file handles are per process (DataLoader workers fork or spawn)
            self._handles, self._pid = {}, os.getpid()
        t, offset, size, _ = self.entries[index]
        if t not in self._handles:
            self._handles[t] = open(self.tars[t], "rb")  # noqa: SIM115 (kept open for the stream's lifetime)
        f = self._handles[t]
        f.seek(offset)
        return f.read(size)

    def name(self, index: int) -> str:
        t, _, _, member = self.entries[index]
        return f"{self.tars[t].name}:{member}"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, -1
        return state


def _check_indexed_member(path: Path, member: tarfile.TarInfo) -> None:
    """Members are read by offset, never extracted, so nested names are fine; what cannot be read as an image file,
    or names that would be unsafe anywhere, are refused."""
    check_member_name(member.name, nested=True, source=path)
    if not member.isfile():
        raise UnsafeArchiveError(f"{path}: member {member.name!r} is not a regular file")


def build_source(data: Sequence[Path] | Path | str) -> ImageSource:
    """A list of `.tar` shards, one `.tar`, a folder of `.tar` shards, or an image folder (recursive)."""
    paths = [Path(data)] if isinstance(data, str | Path) else [Path(p) for p in data]
    if not paths:
        raise ValueError("no training data given: pass corpus shard .tar files or an image folder")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"training data not found: {missing}")
    if len(paths) == 1 and paths[0].is_dir():
        tars = sorted(paths[0].glob("*.tar"))
        source: ImageSource = TarShardSource.from_tars(tars) if tars else FolderSource.from_root(paths[0])
    elif all(p.is_file() and p.suffix == ".tar" for p in paths):
        source = TarShardSource.from_tars(paths)
    else:
        raise ValueError(f"expected .tar shards or a single image folder, got {[str(p) for p in paths]}")
    if len(source) == 0:
        raise ValueError(f"no images found in {[str(p) for p in paths]} (extensions: {' '.join(sorted(IMAGE_SUFFIXES))})")
    return source


def decode_rgb(data: bytes, keep_grey: bool = False) -> Image.Image | None:
    """Decode an image file to RGB by the rules every reader follows (`infra.images.decode`: EXIF orientation, 16-bit
    to its top byte, alpha on white, HEIC, ...), so a folder trained on directly gives the pixels its run's corpus
    would; greyscale such as MNIST is replicated to 3 channels. None if broken. ``keep_grey``: a greyscale image
    stays one channel ("L"; its RGB is that channel three times)."""
    try:
        return decode(data, None if keep_grey else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None
