"""Each loss term against a naive float64 loop implementation; Sinkhorn marginals; KoLeo guards."""

from __future__ import annotations

import naive_losses
import torch
from torch.testing import assert_close

from training.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss, SoftmaxCentering, sinkhorn_knopp

F64 = torch.float64


def test_dino_loss_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    students = [torch.randn(5, 11, generator=g, dtype=F64) for _ in range(4)]
    teachers = [torch.softmax(torch.randn(5, 11, generator=g, dtype=F64) / 0.07, -1) for _ in range(2)]
    got = DINOLoss(11)(students, teachers)
    assert_close(got, torch.tensor(naive_losses.dino_loss(students, teachers), dtype=F64), rtol=1e-12, atol=1e-12)


def test_softmax_centering_is_an_ema_lagged_one_step():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(6, 7, generator=g) for _ in range(4)]
    centering = SoftmaxCentering(7, center_momentum=0.9)
    center = torch.zeros(1, 7)
    for i, t in enumerate(batches):
        got = centering.softmax_center(t, teacher_temp=0.05)
        if i > 0:  # the center used at step i includes batches 0..i-1 only
            center = 0.9 * center + 0.1 * batches[i - 1].mean(0, keepdim=True)
        assert_close(got, torch.softmax((t - center) / 0.05, -1), rtol=1e-6, atol=1e-7)
        centering.update(t)
    state = centering.state_dict()  # the pending statistic of the last batch is part of the checkpoint
    assert bool(state["has_pending"]) and torch.allclose(state["pending_mean"], batches[-1].mean(0, keepdim=True))


def test_sinkhorn_equals_naive_loop_and_marginals():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 6, generator=g, dtype=F64)
    got = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=3)
    assert_close(got, naive_losses.sinkhorn(logits, 0.1, 3), rtol=1e-10, atol=1e-12)
    assert_close(got.sum(1), torch.ones(9, dtype=F64), rtol=1e-12, atol=1e-12)  # each sample: mass 1
    converged = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=200)
    assert_close(converged.sum(0), torch.full((6,), 9 / 6, dtype=F64), rtol=1e-6, atol=1e-6)  # uniform prototypes
    # Large logits overflow exp() in the reference formula; the shifted version stays finite and equal.
    assert_close(sinkhorn_knopp(logits + 500.0, 0.1), got, rtol=1e-10, atol=1e-12)


def test_ibot_loss_per_image_weighting_equals_naive():
    g = torch.Generator().manual_seed(3)
    masks = torch.zeros(4, 10, dtype=torch.bool)
    masks[0, [1, 2, 5]] = True
    masks[2, [0, 9]] = True  # images 1 and 3 are unmasked but still count in the denominator
    m = int(masks.sum())
    student = torch.randn(m, 8, generator=g, dtype=F64)
    teacher = torch.softmax(torch.randn(m, 8, generator=g, dtype=F64) / 0.05, -1)
    weights = (1 / masks.sum(-1).clamp(min=1).to(F64)).unsqueeze(-1).expand_as(masks)[masks]
    got = IBOTPatchLoss(8).forward_masked(student, teacher, weights, n_images=4)
    assert_close(got, torch.tensor(naive_losses.ibot_loss(student, teacher, masks), dtype=F64), rtol=1e-12, atol=1e-12)


def test_ibot_sinkhorn_single_process_uses_masked_count():
    logits = torch.randn(7, 5, dtype=F64)
    got = IBOTPatchLoss(5).sinkhorn_knopp_teacher(logits, 0.1, n_masked_patches=7)
    assert_close(got, naive_losses.sinkhorn(logits, 0.1, 3), rtol=1e-10, atol=1e-12)


def test_koleo_equals_naive_loop():
    x = torch.randn(12, 16, dtype=F64)
    assert_close(KoLeoLoss()(x), torch.tensor(naive_losses.koleo(x), dtype=F64), rtol=1e-10, atol=1e-10)


def test_koleo_tiny_and_duplicate_batches_are_finite():
    koleo = KoLeoLoss()
    one = torch.randn(1, 8, requires_grad=True)
    loss = koleo(one)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(one.grad).all()
    base = torch.randn(5, 8, dtype=F64)
    dup = torch.cat([base, base[:2]]).requires_grad_(True)  # rows 0,1 duplicated: they are left out
    loss = koleo(dup)
    loss.backward()
    assert_close(loss.detach(), torch.tensor(naive_losses.koleo(dup.detach()), dtype=F64), rtol=1e-10, atol=1e-10)
    assert torch.isfinite(dup.grad).all()
    same = torch.ones(4, 8, requires_grad=True)  # collapsed batch: no usable direction at all
    loss = koleo(same)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(same.grad).all()


def test_losses_run_in_fp32_under_bf16_autocast():
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = KoLeoLoss()(x.bfloat16())
        dino = DINOLoss(16)([x.bfloat16()], [torch.softmax(x, -1)])
    assert got.dtype == torch.float32 and dino.dtype == torch.float32
    assert_close(got, KoLeoLoss()(x.bfloat16().float()))
