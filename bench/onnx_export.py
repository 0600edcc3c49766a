"""The ONNX export against the model it came from: export time, agreement, and inference speed in onnxruntime against
this project's torch forward, side by side in one process.

    python bench/onnx_export.py [--arch vit_small] [--patch 14] [--size 224] [--batch 8] [--rounds 5] [--checkpoint P]

Builds the backbone (random weights, or `--checkpoint`), exports it with `lvd export`'s code (`training.export.
formats.export_model(..., "onnx")`: the graph at `--size`, checked with onnxruntime before it is kept), then times
`--rounds` interleaved rounds of one batch through each: torch fp32 under `inference_mode` (the forward `lvd evaluate`
runs in fp32) and an onnxruntime CPU session, both on the same number of threads (the CPUs this process may use).
Prints the medians in images/s, their ratio (onnxruntime / torch) and the largest difference of the class and patch
tokens on the timed batch. The first call of each is made before the rounds (warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe_machine
from infra.cpus import cpus
from training.checkpoint import load_backbone
from training.export.formats import export_model
from training.registry import build_backbone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--checkpoint", type=Path, default=None)
    args = p.parse_args()
    import onnxruntime as ort

    threads = cpus()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = (load_backbone(args.checkpoint) if args.checkpoint else
             build_backbone(args.arch, patch_size=args.patch, img_size=args.size)).eval()
    print(describe_machine(torch.device("cpu"), threads))
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        exported = export_model(model, "onnx", dest, image_size=args.size)
        export_s = time.perf_counter() - t0
        mb = dest.stat().st_size / 2**20
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(dest), options, providers=["CPUExecutionProvider"])
        x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
        feed = {"pixel_values": x.numpy()}

        def run_torch():
            with torch.inference_mode():
                out = model.forward_features(x)
            return out["x_norm_clstoken"].numpy(), out["x_norm_patchtokens"].numpy()

        def run_ort():
            return tuple(session.run(["cls_token", "patch_tokens"], feed))

        runners = {"torch fp32": run_torch, "onnxruntime": run_ort}
        outs = {name: fn() for name, fn in runners.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(args.rounds):
            for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
                t0 = time.perf_counter()
                runners[name]()
                times[name].append(time.perf_counter() - t0)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(outs["torch fp32"], outs["onnxruntime"], strict=True))
    print(f"{args.arch}/{args.patch} at {args.size} px: export {export_s:.1f} s, {mb:.0f} MB; {exported.notes[0]}")
    print(f"{'runtime':<12} {'images/s':>9} {'ms/batch':>9}   (batch {args.batch}, {args.rounds} rounds, medians)")
    rate = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate[name] = args.batch / med
        print(f"{name:<12} {rate[name]:>9.1f} {med * 1000:>9.1f}")
    print(f"ratio onnxruntime / torch fp32: {rate['onnxruntime'] / rate['torch fp32']:.2f}x; "
          f"largest |difference| on the timed batch: {diff:.1e}")


if __name__ == "__main__":
    main()
