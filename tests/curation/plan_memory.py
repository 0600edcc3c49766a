"""Peak memory of :func:`curation.urls.plan_shards` on a short and a 4x longer URL list, by three instruments: the
Python heap (tracemalloc), Arrow's memory pool (tracemalloc does not see it) and the peak RSS (everything, allocator
slack included). Linux only (``/proc/self``).

Run as ``python -m tests.curation.plan_memory SPECS_JSON`` in a fresh process (it swaps Arrow's default memory pool);
prints one JSON result per spec. Every measurement runs in its own child forked from this process once the modules
are imported, so no list starts with memory an earlier one left in the allocators (which hid the growth of the
control, whose whole list waits in Arrow memory, from the RSS peak). The child plans the short list once first (lazy
initialisation, allocator pools grown to the working set), then measures one list with a fresh Arrow proxy pool, a
fresh tracemalloc peak and a reset peak RSS (``/proc/self/clear_refs``).

Each list is measured ``REPEATS`` times and each peak is the least of the repeats: the Arrow and Python peaks are the
same every time, but the RSS peak of the very same plan jumps now and then by ~30 MB of allocator slack (anonymous
memory, seen in about one run in six, with Arrow's and Python's peaks unchanged). Memory a plan holds in proportion to
its list is there in every repeat. (Parquet lists were decoded on Arrow's thread pool until this test, run on a busy
machine, showed 17-30 MB of slack in the least of three runs: they are now read on one thread.)
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa

from curation.urls import plan_shards, url_duplicates
from infra.config.data import DataConfig
from infra.config.ingest import IngestConfig


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


_POOLS: list[pa.MemoryPool] = []  # a proxy must outlive every buffer it allocated: it lives as long as the process


def measure(path: Path, plan_dir: Path, cfg: IngestConfig) -> dict[str, int]:
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    _POOLS.append(pool)
    pa.set_memory_pool(pool)
    tracemalloc.start()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_bytes("VmRSS")
    rows = plan_shards(DataConfig(url_list=path), cfg, plan_dir).n_rows
    rss = _status_bytes("VmHWM") - before
    python = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    duplicates = len(url_duplicates(plan_dir, 0, rows))
    return {"rows": rows, "duplicates": duplicates, "python_peak": python, "arrow_peak": pool.max_memory(),
            "rss_peak": rss}  # fmt: skip


REPEATS = 3


def _child(spec: dict, size: str, run: int, conn) -> None:
    cfg = IngestConfig(shard_size=spec["shard_size"], chunk_rows=spec["chunk_rows"], url_dedup_buckets=16)
    plan = Path(spec["plan"]) / f"{size}-{run}"
    plan_shards(DataConfig(url_list=Path(spec["short"])), cfg, plan / "warm")
    conn.send(measure(Path(spec[size]), plan / "measured", cfg))


def _measure_in_child(spec: dict, size: str, run: int) -> dict[str, int]:
    ctx = mp.get_context("fork")  # the modules are imported once; each child starts from this process's memory
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(spec, size, run, send))
    child.start()
    send.close()
    result = recv.recv()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"measurement of {spec[size]} exited with {child.exitcode}")
    return result


def main(specs: list[dict]) -> list[dict[str, dict[str, int]]]:
    out = []
    for spec in specs:
        result = {}
        for size in ("short", "long"):
            runs = [_measure_in_child(spec, size, i) for i in range(REPEATS)]
            result[size] = {key: min(r[key] for r in runs) for key in runs[0]}
        out.append(result)
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
