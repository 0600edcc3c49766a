"""Naive loop implementations of the SSL losses, in float64, written from the reference description."""

from __future__ import annotations

import math

import torch


def log_softmax_row(row, temp):
    z = [v / temp for v in row.tolist()]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def dino_loss(student_views, teacher_views, student_temp=0.1):
    total = 0.0
    for s in student_views:
        for t in teacher_views:
            rows = []
            for b in range(s.shape[0]):
                lsm = log_softmax_row(s[b], student_temp)
                rows.append(sum(tk * lk for tk, lk in zip(t[b].tolist(), lsm, strict=True)))
            total -= sum(rows) / len(rows)
    return total


def ibot_loss(student, teacher, masks, student_temp=0.1):
    """masks: [n_images, N] bool; student/teacher rows in flattened masked order."""
    n_images = masks.shape[0]
    counts = masks.sum(1).tolist()
    owners = [i for i in range(n_images) for j in range(masks.shape[1]) if masks[i, j]]
    total = 0.0
    for r, img in enumerate(owners):
        lsm = log_softmax_row(student[r], student_temp)
        ce = sum(tk * lk for tk, lk in zip(teacher[r].tolist(), lsm, strict=True))
        total += ce / counts[img]
    return -total / n_images


def sinkhorn(logits, temp, n_iterations=3):
    m, k = logits.shape
    q = [[math.exp(logits[i, j].item() / temp) for i in range(m)] for j in range(k)]  # K x M
    total = sum(sum(r) for r in q)
    q = [[v / total for v in r] for r in q]
    for _ in range(n_iterations):
        q = [[v / sum(r) / k for v in r] for r in q]
        cols = [sum(q[j][i] for j in range(k)) for i in range(m)]
        q = [[q[j][i] / cols[i] / m for i in range(m)] for j in range(k)]
    return torch.tensor([[q[j][i] * m for j in range(k)] for i in range(m)], dtype=torch.float64)


def koleo(x, eps=1e-8, skip_duplicates=True):
    rows = []
    for v in x:
        n = math.sqrt(sum(a * a for a in v.tolist()))
        rows.append([a / max(n, eps) for a in v.tolist()])
    losses = []
    for i, a in enumerate(rows):
        best, best_j = -float("inf"), None
        for j, b in enumerate(rows):
            if j != i:
                dot = sum(p * q for p, q in zip(a, b, strict=True))
                if dot > best:
                    best, best_j = dot, j
        b = rows[best_j]
        if skip_duplicates and a == b:
            continue
        d = math.sqrt(sum((p - q + eps) ** 2 for p, q in zip(a, b, strict=True)))
        losses.append(-math.log(d + eps))
    return sum(losses) / len(losses) if losses else 0.0
