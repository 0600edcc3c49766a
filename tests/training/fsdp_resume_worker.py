"""Started by torchrun from test_distributed.py: Lightning's FSDP strategy (`train.strategy=fsdp`, the GPU path) on
CPU processes (gloo), through `training.pretrain` as a user runs it.

`two` (2 processes): an uninterrupted run (`whole`); a run preempted at step 5 (`run`, a sharded checkpoint: one file
per rank), copied to `reshard`, then resumed on the same 2 processes; the same preempted run under DDP (`ddp`, a
one-file checkpoint); 2 steps of DDP distillation from `whole`'s teacher bundle (`distill`, each rank's final state in
`rank{r}.pt`). `one` (1 process): `reshard` and `ddp` resumed on 1 process x 2 micro-batches (the same global batch).
`whole` and `reshard` record the sample positions of every step (`positions_rank{r}.json`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import DumpState, SeenPositions
from tiny import tiny_config

from training.pretrain import pretrain

if __name__ == "__main__":
    data, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    if mode == "two":
        fsdp = tiny_config(strategy="fsdp", devices=2, cpu_threads=1)
        pretrain(data, out / "whole", fsdp, seed=0, callbacks=[SeenPositions(out / "whole")])
        pretrain(data, out / "run", fsdp, seed=0, interrupt_at=5)
        if dist.get_rank() == 0:
            shutil.copytree(out / "run", out / "reshard")
        dist.barrier()
        pretrain(data, out / "run", fsdp, seed=0)
        pretrain(data, out / "ddp", tiny_config(strategy="ddp", devices=2, cpu_threads=1), seed=0, interrupt_at=5)
        distill = tiny_config(strategy="ddp", devices=2, cpu_threads=1, max_steps=2, mode="distill",
                              teacher_weights=str(out / "whole" / "teacher_checkpoint.safetensors"))
        (out / "distill").mkdir(exist_ok=True)
        pretrain(data, out / "distill", distill, seed=0, callbacks=[DumpState(out / "distill")])
    else:
        one = {"devices": 1, "accumulate_grad_batches": 2, "cpu_threads": 1}
        pretrain(data, out / "reshard", tiny_config(strategy="fsdp", **one), seed=0,
                 callbacks=[SeenPositions(out / "reshard")])
        pretrain(data, out / "ddp", tiny_config(strategy="ddp", **one), seed=0)
