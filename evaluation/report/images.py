"""Thumbnails for the report: images looked up by id in a run's shards or image sets, embedded as data URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from infra.datasets import iter_images
from infra.images import decode
from infra.shards import iter_tar, list_shards

THUMB = 112  # px, the longer side; small images (digits) are kept small and scaled up by the browser, pixelated


@dataclass(frozen=True)
class Thumb:
    uri: str  # data:image/png;base64,...
    small: bool  # a tiny source image (a digit): the browser scales it up pixelated rather than blurred

    @property
    def css(self) -> str:
        return "" if self.small else "photo"


def thumbnail(data: bytes, size: int = THUMB) -> Thumb:
    img = decode(data)
    small = max(img.size) <= 48
    if max(img.size) > size:
        img.thumbnail((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return Thumb("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), small)


def read_shard_images(shard_dir: Path, image_ids: Iterable[str]) -> dict[str, bytes]:
    """Bytes of the wanted images from ``<shard_dir>/*.tar``; only the shards that hold them are read."""
    wanted = set(image_ids)
    if not wanted:
        return {}
    out: dict[str, bytes] = {}
    for shard in list_shards(shard_dir):
        ids = set(pd.read_parquet(shard.table, columns=["image_id"])["image_id"]) & wanted
        if not ids:
            continue
        for key, _, data in iter_tar(shard.tar):
            if key in ids:
                out[key] = data
        if len(out) == len(wanted):
            break
    return out


def read_set_images(path: Path, image_ids: Iterable[str], fmt: str = "auto") -> dict[str, bytes]:
    """Bytes of the wanted images (by content hash) from a dataset in any supported format."""
    wanted = set(image_ids)
    out: dict[str, bytes] = {}
    if not wanted or not Path(path).exists():
        return out
    for item in iter_images(Path(path), fmt):
        if item.image_id in wanted:
            out[item.image_id] = item.data
            if len(out) == len(wanted):
                break
    return out
