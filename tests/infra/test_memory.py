"""infra.memory: freed heap memory goes back to the OS."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from infra.memory import release_free_heap


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_freed_small_blocks_are_returned() -> None:
    blocks = [np.ones(12_000) for _ in range(4000)]  # 96 KB each: below malloc's mmap threshold, on the heap
    keep = blocks[-1]  # one live block at the top of the heap keeps the freed ones below it from being trimmed
    del blocks
    before = rss_anon()
    assert release_free_heap()
    assert before - rss_anon() > 200 * 2**20  # most of the ~380 MB freed
    assert keep.sum() == 12_000
