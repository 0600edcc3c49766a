"""One line saying what a benchmark ran on: CPU model, bf16 instructions and their measured speed, threads, load."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device, threads: int) -> str:
    from infra.cpus import budget
    from infra.precision import cpu_bf16_flags, cpu_bf16_speedup, resolve

    if device.type == "cuda":
        return (f"device: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda}); "
                f"host CPU {cpu_model()}, {threads} threads")
    flags = [name for name, has in (("AMX", torch.cpu._is_amx_tile_supported()),
                                    ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported())) if has]
    speed = f"bf16 matmul {cpu_bf16_speedup():.1f}x fp32 (512^3 probe)" if cpu_bf16_flags() else "bf16 emulated"
    return (f"device: cpu {cpu_model()}, {budget().describe()}, {threads} torch threads, bf16 instructions: "
            f"{'+'.join(flags) or 'none'}, {speed}, precision auto -> {resolve('auto', 'cpu')}; torch "
            f"{torch.__version__}; load average {os.getloadavg()[0]:.1f}")
