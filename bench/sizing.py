"""Sizing of the curation stages for a 1-2 billion image crawl, from this project's measurements (docs/scaling.md).

    python bench/sizing.py [--pool 1.3e9]

Every input is a measurement named next to it (or a published spec, marked "spec"); the script only does the
arithmetic, so the tables in docs/scaling.md can be regenerated when a measurement changes.
"""

from __future__ import annotations

import argparse
import math

# --- measured (bench/curate_throughput.py, 2026-11-22, 2-core Xeon @2.5 GHz, AVX-512 VNNI, no AMX/bf16) ---
JPEG_BYTES = 34_293  # mean ingested JPEG (q95, short side 256) of 7 scikit-image photos
DECODE_PER_CORE = 466  # JPEG decode + RGB, images/s on one core (same photos)
SSCD_GFLOP = 16.68  # SSCD ResNet-50 at 320x320, FLOPs per image (torch FlopCounterMode)
VITH_GFLOP = 248.27  # ViT-H/16 at 224, FLOPs per image (torch FlopCounterMode)
SSCD_CPU_UTIL = 18.8 / 56.8  # achieved fp32 GFLOP/s of SSCD / best fp32 matmul peak measured that day
VITH_CPU_UTIL = 43.5 / 56.8  # same for ViT-H/16
# --- measured (bench/curate_scale.py --n 1000000, 2026-11-30, 2-core AMD EPYC AVX2, idle; docs/scaling.md) ---
KMEANS_UTIL = 0.718  # k-means assignment GFLOP/s / fp32 matmul peak in the same run
EDGES_PER_IMAGE = 119_442 / 1_000_000  # kept kNN edges per image at cosine > 0.6 (synthetic pool, 2% planted copies)
# --- measured (bench/curate_scale.py --n 250000,1000000, 2026-12-06, 2-core AMD EPYC AVX-512 bf16, load 6-10) ---
DEDUP_SCANNED = 4_724.5  # list members scored per vector at 1M (4,548.4 at 250k): lists of 512, 8 + 64 probed
DEDUP_LIST_SIZE = 512  # dedup.index.list_size (the default)
HNSW_SCORED = 801.9  # centroids scored per vector by the HNSW quantizer (M 32, ef 64) at 2,452 lists (1M pool)
HNSW_GROWTH = 801.9 / 443.1  # the same at 606 lists (250k pool): x1.81 per x4 lists
DEMO_EDGES_PER_IMAGE = 267 / 3_192  # same on the demo crawl (pixel descriptor, 0.995)
LEDGER_BYTES_PER_ROW = 345  # curation-stage ledger bytes per input row on the demo run (parquet, JSON details)
# --- published specs (not measured here) ---
H100_BF16_DENSE = 989e12  # NVIDIA H100 SXM dense bf16 tensor-core FLOP/s (spec)
H100_MEM = 80e9

DIM_SSCD, DIM_EMB = 512, 1280  # SSCD descriptor; ViT-H/16 embedding
PQ_M, NLIST = 64, 262_144  # configs/curation/lvd142m.yaml retrieval index


def gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB" if x < 1e12 else f"{x / 1e12:,.2f} TB"


def hierarchical_flops(n: float, d: int = DIM_EMB, iters: int = 50) -> float:
    """FLOPs of the web-config hierarchy: per level, a k-means on its inputs (level 1 on a 100M fit sample, split
    into 100 children locally), then each resampling step re-runs k-means on k x sample_size points and reassigns
    every input of the level."""
    total = (iters + 1) * 2 * 100e6 * 100_000 * d + 2 * n * 100_000 * d  # level 1 fit + assign
    total += (iters + 1) * 2 * n * 100 * d  # the split: each point against its cluster's 100 children
    inputs = 10_000_000
    for k, steps, size in ((500_000, 10, 10), (50_000, 10, 5), (10_000, 10, 3)):
        level = (iters + 1) * 2 * inputs * k * d
        level += (steps - 1) * ((iters + 1) * 2 * (k * size) * k * d + 2 * inputs * k * d)
        total += level
        inputs = k
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pool", type=float, default=1.3e9, help="images entering dedup (paper A.3: 1.3B)")
    a = p.parse_args()
    n = a.pool
    after_self = n * 1.1 / 1.3  # paper A.3 ratios: 1.3B -> 1.1B -> 744M
    after_rel = n * 0.744 / 1.3
    print(f"## pool {n / 1e9:.1f}B images (self-dedup -> {after_self / 1e9:.2f}B, relative -> {after_rel / 1e9:.2f}B)\n")
    rows = [
        ("ingest shards (JPEG q95, 256 px)", JPEG_BYTES, n),
        ("dedup descriptors (SSCD 512 x fp16, 1 view)", DIM_SSCD * 2, n),
        ("dedup index lists (fp16 copy + int64 id)", DIM_SSCD * 2 + 8, n),
        ("dedup kNN edges kept (20 B/edge, measured edges/image)", 20 * EDGES_PER_IMAGE, n),
        ("embeddings (ViT-H/16 1280 x fp16)", DIM_EMB * 2, after_rel),
        ("retrieval IVF-PQ codes (64 B + 8 B id)", PQ_M + 8, after_rel),
        ("k-means assignment per level (int64 + fp32 dist)", 12, after_rel),
        ("ledger, curation stages", LEDGER_BYTES_PER_ROW, n),
        ("corpus shards (142M/1.3B of the pool)", JPEG_BYTES, n * 142e6 / 1.3e9),
    ]
    print("| stage | bytes / image | images | total |\n|---|---|---|---|")
    for name, b, count in rows:
        print(f"| {name} | {b:,.0f} | {count / 1e9:.2f}B | {gb(b * count)} |")
    quant = NLIST * DIM_EMB * 4
    codes = (PQ_M + 8) * after_rel
    print(f"\nIVF-PQ (nlist {NLIST:,}, PQ{PQ_M}x8) over {after_rel / 1e9:.2f}B: codes {gb(codes)} + coarse quantizer "
          f"{gb(quant)} = {gb(codes + quant)} -> {int(-(-(codes + quant) // (0.8 * H100_MEM)))} x 80 GB GPUs at 80% fill")
    print("\n## k-means (FLOPs = 2 n k D per pass; fp32 centroids)\n")
    print("| what | points n | clusters k | FLOPs / pass | centroids | H100-hours / pass |\n|---|---|---|---|---|---|")
    rate = KMEANS_UTIL * H100_BF16_DENSE
    for what, pts, k, d in [
        ("retrieval k-means (A.4), fit on 500/cluster", 100_000 * 500, 100_000, DIM_EMB),
        ("retrieval k-means (A.4), assign the pool", after_rel, 100_000, DIM_EMB),
        ("rebalance level 1, 1M clusters (direct)", after_rel, 1_000_000, DIM_EMB),
        ("rebalance level 1, 10M clusters (direct, web config)", after_rel, 10_000_000, DIM_EMB),
        ("rebalance level 1 as 100k x split 100 (reference)", after_rel, 100_000 + 100, DIM_EMB),
        ("rebalance level 2", 10_000_000, 500_000, DIM_EMB),
        ("rebalance level 3", 500_000, 50_000, DIM_EMB),
        ("rebalance level 4", 50_000, 10_000, DIM_EMB),
    ]:
        f = 2 * pts * k * d
        print(f"| {what} | {pts:,.0f} | {k:,} | {f:.2e} | {gb(k * d * 4)} | {f / rate / 3600:,.2f} |")
    nl = n / DEDUP_LIST_SIZE  # dedup: lists of a fixed size, the scan per vector measured flat in n
    flat_q = 2 * n * (DEDUP_SCANNED + nl) * DIM_SSCD  # flat quantizer: every centroid per vector
    print(f"| dedup kNN graph (ivf_blocks, lists of {DEDUP_LIST_SIZE} = {nl:,.0f} lists, flat quantizer) | {n:,.0f} | - | "
          f"{flat_q:.2e} | {gb(nl * DIM_SSCD * 4)} | {flat_q / rate / 3600:,.2f} |")
    hnsw = HNSW_SCORED * HNSW_GROWTH ** math.log(nl / 2452, 4)  # the measured growth per x4 lists, extrapolated
    f = 2 * n * (DEDUP_SCANNED + hnsw) * DIM_SSCD
    print(f"| dedup kNN graph (ivf_blocks, lists of {DEDUP_LIST_SIZE}, HNSW quantizer: ~{hnsw:,.0f} centroids scored per "
          f"vector, extrapolated) | {n:,.0f} | - | {f:.2e} | {gb(nl * DIM_SSCD * 4)} | {f / rate / 3600:,.2f} |")
    total = hierarchical_flops(after_rel)
    print(f"| rebalancing total, web config (levels 100k x split 100 / 500k / 50k / 10k; resampling 1/10/10/10; "
          f"50 Lloyd iterations; level 1 fitted on 100M) | {after_rel:,.0f} | - | {total:.2e} | - | {total / rate / 3600:,.1f} |")
    retrieval_km = 21 * 2 * 50e6 * 100_000 * DIM_EMB + 2 * after_rel * 100_000 * DIM_EMB
    print(f"| retrieval k-means total (20 iterations on 50M, then assign all) | {after_rel:,.0f} | 100,000 | "
          f"{retrieval_km:.2e} | 0.5 GB | {retrieval_km / rate / 3600:,.2f} |")
    print("\n## GPU-hours per stage (H100; compute at the CPU-measured fraction of matmul peak, decode on 16 cores)\n")
    print("| stage | images | GFLOP / image | compute H100-h | decode-bound h (16 cores/GPU) | estimate H100-h |\n|---|---|---|---|---|---|")
    for name, imgs, gf, util in [("SSCD descriptors (320 px)", n, SSCD_GFLOP, SSCD_CPU_UTIL),
                                 ("ViT-H/16 embeddings (224 px)", after_rel, VITH_GFLOP, VITH_CPU_UTIL)]:  # fmt: skip
        compute = imgs * gf * 1e9 / (util * H100_BF16_DENSE) / 3600
        decode = imgs / (16 * DECODE_PER_CORE) / 3600
        print(f"| {name} | {imgs / 1e9:.2f}B | {gf} | {compute:,.0f} | {decode:,.0f} | {max(compute, decode):,.0f} |")


if __name__ == "__main__":
    main()
