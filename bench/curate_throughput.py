"""Per-image costs of the curation models, measured on this machine (inputs to docs/scaling.md).

    python bench/curate_throughput.py

For each model: FLOPs per image (counted by torch's FlopCounterMode, exact for the architecture), images/s on
this CPU in fp32 and bf16 autocast, and the achieved FLOP rate. Also the bytes of a typical ingested image (the
package photos at ingest's default 256-px keep-ratio size, JPEG q95) and JPEG decode throughput.
"""

from __future__ import annotations

import io
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from infra.cpus import cpus


def flops_per_image(model: torch.nn.Module, size: int) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, size, size))
    return float(fc.get_total_flops())


def images_per_second(model: torch.nn.Module, size: int, batch: int, bf16: bool, seconds: float = 10.0) -> float:
    x = torch.randn(batch, 3, size, size)
    n, start = 0, time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x[:1])
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += batch
    return n / (time.perf_counter() - start)


def models() -> dict[str, tuple[torch.nn.Module, int, int]]:
    import timm

    from curation.models.sscd import SSCDModel

    vith16 = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=1280, depth=32, num_heads=16, num_classes=0)  # paper §3 retrieval model
    vitl14 = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16, num_classes=0)
    return {"sscd_resnet50_320": (SSCDModel().eval(), 320, 8), "sscd_resnet50_288": (SSCDModel().eval(), 288, 8),
            "vit_h16_224": (vith16.eval(), 224, 2), "vit_l14_224": (vitl14.eval(), 224, 2)}  # fmt: skip


def photo_bytes() -> dict[str, float]:
    import skimage.data

    sizes, decode = [], []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        s = 256 / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        sizes.append(len(buf.getvalue()))
        t = time.perf_counter()
        for _ in range(50):
            Image.open(io.BytesIO(buf.getvalue())).convert("RGB").load()
        decode.append((time.perf_counter() - t) / 50)
    return {"jpeg_q95_256px_bytes_mean": float(np.mean(sizes)), "decode_images_per_s_per_core": float(1 / np.mean(decode))}


def main() -> None:
    torch.set_num_threads(cpus())  # the CPUs this process may use (a container quota included)
    out = {"cpus": cpus(), **photo_bytes()}
    print(json.dumps(out), flush=True)
    for name, (model, size, batch) in models().items():
        f = flops_per_image(model, size)
        row = {"model": name, "size": size, "gflop_per_image": round(f / 1e9, 2)}
        for bf16 in (False, True):
            ips = images_per_second(model, size, batch, bf16)
            row["bf16" if bf16 else "fp32"] = {"images_per_s": round(ips, 2), "gflops_per_s": round(ips * f / 1e9, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
