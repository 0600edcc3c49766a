"""Shared fixtures of the training tests: two CPU threads, deterministic seeds, tiny image sets."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Test helpers (naive reference implementations) import as top-level modules whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield


def write_images(root: Path, n: int, size: int = 28, seed: int = 0, mode: str = "L") -> list[Path]:
    """n small random-blob images (grayscale by default, like MNIST) in a nested folder."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = np.zeros((size, size), dtype=np.uint8)
        y, x = rng.integers(4, size - 4, size=2)
        arr[max(0, y - 4):y + 4, max(0, x - 6):x + 6] = rng.integers(128, 256)
        img = Image.fromarray(arr, "L").convert(mode)
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"img{i:04d}.png"
        img.save(p)
        paths.append(p)
    return paths


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_images(root, 48)
    return root
