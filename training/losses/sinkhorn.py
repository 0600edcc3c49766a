"""Sinkhorn-Knopp normalisation of teacher logits (SwAV / reference `sinkhorn_knopp_teacher`, 3 iterations).

Q = exp(t / T)^T (K x B) is scaled to a global sum of 1, then rows (prototypes) and columns (samples) are
alternately normalised to 1/K and 1/B, with row sums and the total all-reduced across ranks; finally Q * B, so each
sample's assignment sums to 1. B is the *global* number of samples (local rows x world size for DINO, the
all-reduced masked-patch count for iBOT).

Deviation (numerically identical results): logits are shifted by their global max before `exp` (the shift
cancels in the first normalisation; the reference can overflow once prototype norms grow), and row sums are
clamped at the smallest normal float so a prototype that no sample reaches yields zeros instead of NaN.
"""

from __future__ import annotations

import torch

from training.distributed import all_reduce, world_size
from training.losses.numerics import upcast


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                   n_samples: int | torch.Tensor | None = None) -> torch.Tensor:
    """[M, K] logits -> [M, K] assignments (rows sum to 1). `n_samples`: this rank's count of real rows
    (default M); it is summed across ranks to give B."""
    with torch.autocast(teacher_logits.device.type, enabled=False):
        t = upcast(teacher_logits) / teacher_temp
        shift = t.max() if t.numel() else torch.tensor(float("-inf"), device=t.device)
        shift = all_reduce(shift.clone(), op="max")  # one global shift: it cancels in the first normalisation
        q = torch.exp(t - shift).t()  # K, M
        if n_samples is None:
            b = torch.tensor(float(q.shape[1] * world_size()), dtype=q.dtype, device=q.device)
        else:
            b = all_reduce(torch.as_tensor(n_samples, dtype=q.dtype, device=q.device).clone())
        k = q.shape[0]
        q /= all_reduce(q.sum())
        tiny = torch.finfo(q.dtype).tiny
        for _ in range(n_iterations):
            q /= all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # each prototype: total mass 1/K
            q /= k
            q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # each sample: mass 1/B
            q /= b
        q *= b
        return q.t()
