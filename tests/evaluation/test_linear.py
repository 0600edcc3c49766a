import numpy as np
import torch

from evaluation.features import Features
from evaluation.linear import CODE_LRS, PAPER_LRS, ProbeBank, batch_indices, linear_probe, lr_grid, probe_input


def naive_probe(train, ytr, val, yval, n_last, avgpool, lr, w0, batch, iterations):
    """One classifier alone, float64, torch's own SGD + CosineAnnealingLR (the reference's optimiser)."""
    x = probe_input(train, n_last, avgpool).double()
    y = torch.from_numpy(ytr)
    lin = torch.nn.Linear(x.shape[1], w0.shape[1]).double()
    with torch.no_grad():
        lin.weight.copy_(w0.T.double())
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=lr * batch / 256, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=0)
    for idx in batch_indices(len(y), batch, iterations, seed=0):
        loss = torch.nn.functional.cross_entropy(lin(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return float((lin(probe_input(val, n_last, avgpool).double()).argmax(1).numpy() == yval).mean() * 100)


def offset_toy(rng, n, offset):
    """Two classes separated along feature 0 (x0 = +-[0.5, 1.5]); feature 1 is a large common offset."""
    y = np.arange(n) % 2
    cls = np.zeros((n, 1, 2), np.float32)
    cls[:, 0, 0] = np.where(y == 1, 1.0, -1.0) * rng.uniform(0.5, 1.5, n)
    cls[:, 0, 1] = offset + rng.normal(size=n) * 0.5
    return Features(cls, rng.normal(size=(n, 2)).astype(np.float32)), y


def test_lr_grids_are_the_reference_code_and_paper_grids():
    assert lr_grid("code") == CODE_LRS and len(CODE_LRS) == 13 and (CODE_LRS[0], CODE_LRS[-1]) == (1e-5, 0.1)
    assert lr_grid("paper") == PAPER_LRS and len(PAPER_LRS) == 13 and (PAPER_LRS[0], PAPER_LRS[-1]) == (1e-4, 0.5)
    assert lr_grid([0.5, 1]) == (0.5, 1.0)


def test_selects_the_right_learning_rate_on_a_separable_toy_set():
    # Separable, but with a large common offset (as un-centred class tokens have): in 50 iterations a too-small lr
    # barely moves the random init and a too-large one oscillates along the offset; both end up predicting one
    # class for every image (50 %). Only 0.1 separates the classes.
    rng = np.random.default_rng(1)
    train, ytr = offset_toy(rng, 64, 50.0)
    val, yv = offset_toy(rng, 64, 50.0)
    res = linear_probe(train, ytr, val, yv, val, yv, 2, n_last_blocks=(1,), avgpool=(False,), lrs=(1e-3, 1e-1, 10.0),
                       batch_size=16, iterations=50)
    assert res.val_top1 == {"n1_lr0.001": 50.0, "n1_lr0.1": 100.0, "n1_lr10": 50.0}
    assert (res.best.n_last, res.best.avgpool, res.best.base_lr) == (1, False, 0.1)
    assert (res.test_top1, res.test_top5) == (100.0, 100.0)


def test_joint_training_equals_each_classifier_trained_alone_in_float64():
    rng = np.random.default_rng(0)
    n, d = 96, 6
    y = rng.integers(0, 3, n)
    cls = rng.normal(size=(n, 4, d)).astype(np.float32)
    patch_mean = rng.normal(size=(n, d)).astype(np.float32)
    patch_mean[np.arange(n), y] += 2.0  # the class signal is only in the average-pooled patch tokens
    feats = Features(cls, patch_mean)
    tr, va = np.arange(64), np.arange(64, n)
    train, val = feats.take(tr), feats.take(va)
    lrs = (1e-3, 1e-2, 1e-1, 1.0)
    res = linear_probe(train, y[tr], val, y[va], val, y[va], 3, lrs=lrs, batch_size=16, iterations=40)
    gen = torch.Generator().manual_seed(0)  # the probe draws every bank's init from one generator, in layout order
    expected = {}
    for n_last in (1, 4):
        for avgpool in (False, True):
            dim = d * n_last + d * avgpool
            w0 = ProbeBank(dim, 3, lrs, gen).w
            for i, lr in enumerate(lrs):
                name = f"n{n_last}{'_avgpool' if avgpool else ''}_lr{lr:g}"
                expected[name] = naive_probe(train, y[tr], val, y[va], n_last, avgpool, lr, w0[i], 16, 40)
    assert res.val_top1 == expected
    best = max(expected, key=lambda k: expected[k])  # first maximum in (n, avgpool, lr) order
    assert res.best.name == best and res.best.avgpool
