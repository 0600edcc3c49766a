"""curation.vectors: pages of memory-mapped shards leave the resident set on request and read back unchanged."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from curation.vectors import VectorStore, drop_resident, write_vectors


def rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
def test_dropped_pages_leave_the_resident_set_and_read_back_unchanged(tmp_path) -> None:
    x = np.random.default_rng(0).standard_normal((131_072, 256)).astype(np.float16)  # 64 MiB
    store = VectorStore([write_vectors(tmp_path / "a.npy", x)])
    total = sum(float(b.sum(dtype=np.float64)) for _s, b in store.chunks())  # every page mapped
    before = rss_file()
    store.drop_resident()
    assert before - rss_file() > 48 * 2**20
    assert sum(float(b.sum(dtype=np.float64)) for _s, b in store.chunks()) == total
    drop_resident(x)  # an in-memory array: nothing to drop
    lists = np.lib.format.open_memmap(tmp_path / "w.npy", "w+", np.float16, (1000, 8))
    lists[:] = 1.5
    drop_resident(lists)  # written pages are flushed first
    assert float(np.load(tmp_path / "w.npy").sum()) == 12_000.0
