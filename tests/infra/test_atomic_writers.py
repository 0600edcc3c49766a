"""The demo crawl's and the demo check's image writers: a write that fails midway (here: a file-size limit, as a disk
filling up fails it) leaves no partial file under the final name and keeps the previous content."""

from __future__ import annotations

import contextlib
import errno
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from infra.config.data import DemoConfig
from infra.demo.crawl import _Images, _write_class_folder, build_demo_crawl
from training.demo_check import write_folder

LIMIT = 4096


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Writes past `nbytes` fail with EFBIG (RLIMIT_FSIZE, SIGXFSZ ignored) after the first `nbytes` are written."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def noise(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 96, 96), dtype=np.uint8)  # ~9 kB PNGs: over LIMIT


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_failed_image_write_leaves_the_previous_file_and_no_partial_one(tmp_path):
    images = _Images(tmp_path / "images")
    images.add("a.png", b"previous", "photo")
    big = bytes(range(256)) * 40  # 10 kB
    with file_size_limit(LIMIT):
        with pytest.raises(OSError) as err:
            images.add("a.png", big, "photo")
        assert err.value.errno == errno.EFBIG
        with pytest.raises(OSError, match="File too large"):
            _write_class_folder(tmp_path / "seeds", noise(1), np.array([3]), np.array([7]))
        with pytest.raises(OSError, match="File too large"):
            write_folder(noise(2), tmp_path / "pretrain")
    assert files(tmp_path) == ["images/a.png"]  # no truncated file under a final name, no temporary left
    assert (tmp_path / "images" / "a.png").read_bytes() == b"previous"
    images.add("a.png", big, "photo")
    assert (tmp_path / "images" / "a.png").read_bytes() == big


def test_the_demo_crawl_leaves_no_temporary_files(tmp_path):
    cfg = DemoConfig(enabled=True, eval_train_per_class=2, eval_test_per_class=2, seeds_per_class=2, pool_mnist=20,
                     pool_sklearn_digits=4, photos=1, faces=2, nonfaces=2, near_duplicates=4, eval_copies=2)
    info = build_demo_crawl(tmp_path, cfg, port=8000)
    written = files(tmp_path)
    assert [f for f in written if Path(f).name.startswith(".")] == []
    assert sum(f.startswith(("eval/", "seeds/")) for f in written) == 10 * (2 + 2 + 2)
    # Served images: 20 + 4 + 1 + 2 + 2 pool images, 4 near-duplicates, 2 eval copies, 8 planted broken files,
    # 8 quirks and the 4 served only through misbehaving routes (which, with 16 more special URLs, are 20 rows).
    assert sum(f.startswith("images/") for f in written) == 20 + 4 + 1 + 2 + 2 + 4 + 2 + 8 + 8 + 4
    assert info["rows"] == 20 + 4 + 1 + 2 + 2 + 4 + 2 + 8 + 8 + 20 + 3  # + 2 duplicate URLs and a malformed one
