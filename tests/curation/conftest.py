"""Fixtures of the curation tests: a loopback-only network sandbox, tiny image pools written as real shards,
and labelled image folders."""

from __future__ import annotations

import io
import ipaddress
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from infra.shards import Shard, ShardWriter
from infra.storage import sha256_bytes


@pytest.fixture
def loopback_only(monkeypatch):
    """Every connect() of the test goes to a loopback address, or the test fails (and nothing is sent)."""
    seen: list[str] = []
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        seen.append(host)
        if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            raise AssertionError(f"test tried to connect to non-loopback {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg(img: Image.Image, quality: int = 35) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def crop7(img: Image.Image) -> Image.Image:
    """The demo crawl's crop: 7% of the short side off every edge, resized back."""
    w, h = img.size
    m = max(1, round(min(w, h) * 0.07))
    return img.crop((m, m, w - m, h - m)).resize((w, h), Image.BICUBIC)


def blob_image(seed: int, size: int = 32) -> Image.Image:
    """A distinct smooth grey image: a few random Gaussian blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    arr = np.zeros((size, size), np.float32)
    for _ in range(4):
        cy, cx, s = rng.uniform(4, size - 4), rng.uniform(4, size - 4), rng.uniform(2, 6)
        arr += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    arr = 255 * arr / arr.max()
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


VARIANTS = {
    "jpeg": lambda im: jpeg(im),
    "resize": lambda im: png(im.resize((im.width * 3 // 2, im.height * 3 // 2), Image.BICUBIC)),
    "crop": lambda im: png(crop7(im)),
    "flip": lambda im: png(ImageOps.mirror(im)),
    "exact": lambda im: png(im),
}


def write_pool(shard_dir: Path, items: list[bytes], shard_size: int = 8) -> list[Shard]:
    """Rows 0..n-1 in shards of ``shard_size``; image_id is the sha256 of the bytes (as ingest does)."""
    shards = []
    for s in range(0, len(items), shard_size):
        with ShardWriter(shard_dir, f"{s // shard_size:05d}") as w:
            for row, data in enumerate(items[s : s + shard_size], start=s):
                w.add(sha256_bytes(data), data, "png" if data[:4] == b"\x89PNG" else "jpg", row_id=row)
        shards.append(Shard(shard_dir / f"{s // shard_size:05d}.tar", shard_dir / f"{s // shard_size:05d}.parquet"))
    return shards


def write_folder(root: Path, images: dict[str, list[Image.Image]]) -> Path:
    """A class-folder dataset: root/<class>/<i>.png."""
    for cls, ims in images.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(ims):
            (root / cls / f"{i:03d}.png").write_bytes(png(im))
    return root


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
