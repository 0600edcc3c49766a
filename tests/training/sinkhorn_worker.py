"""Started by torchrun from test_distributed.py: each rank takes its slice of one fixed batch of teacher logits and
runs the teacher-side normalisations of the losses (Sinkhorn-Knopp for DINO on equal slices and for iBOT on unequal
masked-patch counts; softmax centering with its center update over three steps). Each rank saves its results; the
test compares them with one process on the concatenated batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from training.losses import DINOLoss, IBOTPatchLoss

TEMP = 0.07
WORLD = 2


def inputs() -> dict:
    """The global batches (float64 for Sinkhorn-Knopp; centering computes its statistic in fp32) and their split."""
    g = torch.Generator().manual_seed(0)
    return {
        "dino": 3 * torch.randn(WORLD * 6, 11, generator=g, dtype=torch.float64),  # 6 rows per rank
        "ibot": 3 * torch.randn(5 + 9, 7, generator=g, dtype=torch.float64),
        "ibot_split": [5, 9],  # masked patches per rank: unequal, the count is all-reduced
        "center_dino": [torch.randn(WORLD * 4, 11, generator=g) for _ in range(3)],  # 3 steps, 4 rows per rank
        "center_ibot": [torch.randn(3 + 5, 7, generator=g) for _ in range(3)],
        "center_ibot_split": [3, 5],
    }


def rank_inputs(x: dict, rank: int) -> dict:
    """Rank `rank`'s slice of every batch."""
    def part(t: torch.Tensor, split: list[int] | None = None) -> torch.Tensor:
        return t.split(split or [len(t) // WORLD] * WORLD)[rank]

    return {"dino": part(x["dino"]), "ibot": part(x["ibot"], x["ibot_split"]),
            "center_dino": [part(t) for t in x["center_dino"]],
            "center_ibot": [part(t, x["center_ibot_split"]) for t in x["center_ibot"]]}


def normalise(x: dict) -> dict:
    """The teacher-side computations on this process's batches `x` (a rank's slices, or the whole batches)."""
    dino_loss, ibot_loss = DINOLoss(11), IBOTPatchLoss(7)
    out = {"dino_sk": dino_loss.sinkhorn_knopp_teacher(x["dino"], TEMP),
           "ibot_sk": ibot_loss.sinkhorn_knopp_teacher(x["ibot"], TEMP, n_masked_patches=len(x["ibot"]))}
    for name, loss in (("dino", dino_loss), ("ibot", ibot_loss)):
        probs = []
        for logits in x[f"center_{name}"]:
            probs.append(loss.softmax_center_teacher(logits, TEMP))  # uses the center of the previous steps
            loss.update_center(logits)
        loss.centering.apply_pending()
        out[f"{name}_centered"] = probs
        out[f"{name}_center"] = loss.centering.center.clone()
    return out


if __name__ == "__main__":
    dist.init_process_group("gloo")
    assert dist.get_world_size() == WORLD
    rank = dist.get_rank()
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(normalise(rank_inputs(inputs(), rank)), out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
