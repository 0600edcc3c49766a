"""Peak memory of :func:`curation.urls.plan_shards` on a short and a 4x longer URL list, by three instruments: the
Python heap (tracemalloc), Arrow's memory pool (tracemalloc does not see it) and the peak RSS (everything, allocator
slack included). Linux only (``/proc/self``).

Run as ``python -m tests.curation.plan_memory SPECS_JSON`` in a fresh process (it swaps Arrow's default memory pool);
prints one JSON result per spec. For each spec the short list is planned once first (imports, lazy initialisation,
allocator pools grown to the working set), then the short and the long list are measured one after the other, each
with a fresh Arrow proxy pool, a fresh tracemalloc peak and a reset peak RSS (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import json
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


def measure(path: Path, plan_dir: Path, cfg: IngestConfig, pools: list[pa.MemoryPool]) -> dict[str, int]:
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    pools.append(pool)  # a proxy must outlive every buffer it allocated: it lives as long as the process
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


def main(specs: list[dict]) -> list[dict[str, dict[str, int]]]:
    pools: list[pa.MemoryPool] = []
    out = []
    for spec in specs:
        cfg = IngestConfig(shard_size=spec["shard_size"], chunk_rows=spec["chunk_rows"], url_dedup_buckets=16)
        plan = Path(spec["plan"])
        plan_shards(DataConfig(url_list=Path(spec["short"])), cfg, plan / "warm")
        out.append({size: measure(Path(spec[size]), plan / size, cfg, pools) for size in ("short", "long")})
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
