"""Linear probe on frozen features (dinov2 ``eval/linear.py`` protocol), trained on cached features.

For every (n last blocks, avgpool, lr) a linear classifier reads the concatenated class tokens of the last n blocks,
plus the mean of the last block's patch tokens when avgpool is on (inputs nD or (n+1)D). All classifiers are
trained jointly on the same batches: SGD, momentum 0.9, weight decay 0, cosine annealing to 0, init N(0, 0.01)
with zero bias; each lr is scaled by batch_size / 256. The classifier with the best top-1 on the validation split is
selected (ties: the first in (n, avgpool, lr) order, as the reference's strict ``>``) and reported on test.

Deviation: the reference re-runs the backbone on augmented crops (RandomResizedCrop + flip) at every iteration;
here the classifiers train on features of the centre crop, extracted once (the issue's "cached features").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from evaluation.features import Features

# dinov2 eval/linear.py default grid, and the paper's (§B.3); reference §6 pitfall 5.
CODE_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
PAPER_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 3e-1, 5e-1)


def lr_grid(grid: str | Sequence[float]) -> tuple[float, ...]:
    if isinstance(grid, str):
        return {"code": CODE_LRS, "paper": PAPER_LRS}[grid]
    return tuple(float(x) for x in grid)


@dataclass(frozen=True)
class ProbeSpec:
    n_last: int
    avgpool: bool
    base_lr: float  # the grid value; the optimiser uses base_lr * batch_size / 256

    @property
    def name(self) -> str:
        return f"n{self.n_last}{'_avgpool' if self.avgpool else ''}_lr{self.base_lr:g}"


@dataclass
class LinearProbeResult:
    best: ProbeSpec
    val_top1: dict[str, float]  # every classifier, by ProbeSpec.name
    test_top1: float
    test_top5: float


def probe_input(feats: Features, n_last: int, avgpool: bool) -> torch.Tensor:
    """(N, n*D [+ D]): class tokens of the last n blocks, then (avgpool) the mean of the last block's patch tokens."""
    cls = np.asarray(feats.cls[:, -n_last:], np.float32)
    x = cls.reshape(len(cls), -1)
    if avgpool:
        x = np.concatenate([x, np.asarray(feats.patch_mean, np.float32)], axis=1)
    return torch.from_numpy(np.require(x, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))  # cached features are read-only


def cosine_lr(base: float, it: int, total: int) -> float:
    """torch CosineAnnealingLR(T_max=total, eta_min=0) at iteration ``it`` (stepped once per iteration)."""
    return base * (1 + math.cos(math.pi * it / total)) / 2


def batch_indices(n: int, batch: int, iterations: int, seed: int) -> list[torch.Tensor]:
    """Shuffled epochs, concatenated and cut into batches (an infinite sampler, as the reference's)."""
    g = torch.Generator().manual_seed(seed)
    need = batch * iterations
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-need // n))])
    return list(order[:need].view(iterations, batch))


class ProbeBank:
    """All classifiers of one input layout, trained as one: weights stored (D, L, C) for L learning rates, so the
    forward and backward passes of all L classifiers are single (N, D) x (D, L*C) matrix products."""

    def __init__(self, dim: int, n_classes: int, lrs: Sequence[float], gen: torch.Generator):
        self.n_lrs, self.n_classes = len(lrs), n_classes
        self.lrs = torch.tensor(lrs, dtype=torch.float32)[None, :, None]  # 1, L, 1
        init = torch.randn(len(lrs), dim, n_classes, generator=gen) * 0.01  # nn.Linear init N(0, 0.01), as the reference
        self.wt = init.permute(1, 0, 2).contiguous()  # D, L, C
        self.b = torch.zeros(1, len(lrs), n_classes)
        self.buf_w: torch.Tensor | None = None
        self.buf_b: torch.Tensor | None = None

    @property
    def w(self) -> torch.Tensor:
        """(L, D, C): classifier i's weight matrix is ``w[i]``."""
        return self.wt.permute(1, 0, 2)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.wt.view(x.shape[1], -1)).view(len(x), self.n_lrs, self.n_classes) + self.b  # N, L, C

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x).permute(1, 0, 2)  # L, N, C

    def step(self, x: torch.Tensor, y: torch.Tensor, scale: float, momentum: float, wd: float) -> None:
        """One SGD step (torch semantics: buf = m * buf + (g + wd * p); p -= lr * buf) of every classifier."""
        p = torch.softmax(self._logits(x), -1)
        p[torch.arange(len(y)), :, y] -= 1
        g_logits = p / len(y)  # d mean-CE / d logits, N, L, C
        g_w = (x.T @ g_logits.view(len(y), -1)).view_as(self.wt) + wd * self.wt  # D, L, C
        g_b = g_logits.sum(0, keepdim=True) + wd * self.b
        self.buf_w = g_w if self.buf_w is None else momentum * self.buf_w + g_w
        self.buf_b = g_b if self.buf_b is None else momentum * self.buf_b + g_b
        self.wt -= self.lrs * scale * self.buf_w
        self.b -= self.lrs * scale * self.buf_b


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return float((top == y[..., None]).any(-1).float().mean() * 100)


@torch.no_grad()
def linear_probe(
    train: Features, y_train: np.ndarray, val: Features, y_val: np.ndarray, test: Features, y_test: np.ndarray,
    n_classes: int, *, n_last_blocks: Sequence[int] = (1, 4), avgpool: Sequence[bool] = (False, True),
    lrs: Sequence[float] = CODE_LRS, batch_size: int = 128, iterations: int = 12_500, momentum: float = 0.9,
    weight_decay: float = 0.0, seed: int = 0,
) -> LinearProbeResult:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    layouts = [(n, a) for n in n_last_blocks if n <= train.cls.shape[1] for a in avgpool]
    xs = {lay: probe_input(train, *lay) for lay in layouts}
    banks = {lay: ProbeBank(xs[lay].shape[1], n_classes, lrs, gen) for lay in layouts}
    ytr = torch.from_numpy(np.asarray(y_train, np.int64))
    scale_base = batch_size / 256  # lr scaling of the reference (world size 1)
    for it, idx in enumerate(batch_indices(len(ytr), batch_size, iterations, seed)):
        scale = scale_base * cosine_lr(1.0, it, iterations)
        for lay, bank in banks.items():
            bank.step(xs[lay][idx], ytr[idx], scale, momentum, weight_decay)
    yv = torch.from_numpy(np.asarray(y_val, np.int64))
    val_top1, best, best_acc = {}, None, -1.0
    for lay, bank in banks.items():
        accs = (bank.logits(probe_input(val, *lay)).argmax(-1) == yv).float().mean(1) * 100
        for i, lr in enumerate(lrs):
            spec = ProbeSpec(lay[0], lay[1], float(lr))
            val_top1[spec.name] = float(accs[i])
            if float(accs[i]) > best_acc:
                best, best_acc = (spec, i), float(accs[i])
    assert best is not None, "no classifier: n_last_blocks exceeds the number of extracted blocks"
    spec, i = best
    logits = banks[(spec.n_last, spec.avgpool)].logits(probe_input(test, spec.n_last, spec.avgpool))[i]
    yte = torch.from_numpy(np.asarray(y_test, np.int64))
    return LinearProbeResult(spec, val_top1, topk_accuracy(logits, yte, 1), topk_accuracy(logits, yte, 5))


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a random ``fraction`` of n held out (at least one sample each side)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(n * fraction)), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
