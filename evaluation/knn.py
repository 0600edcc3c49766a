"""k-nearest-neighbour classification on frozen features (dinov2 ``eval/knn.py`` protocol).

Features are L2-normalised; similarity is the dot product. For every test sample the top-max(k) training
neighbours vote with weights softmax(sim / T) taken over those max(k) neighbours (T = 0.07); the class score
for a given k sums the first k weighted votes (no renormalisation per k, which leaves the argmax unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


@torch.inference_mode()
def knn_scores(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, ks: Sequence[int], temperature: float,
    n_classes: int, batch: int = 1024,
) -> dict[int, np.ndarray]:  # fmt: skip
    """Class scores (n_test, n_classes) for each k."""
    xtr = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    ytr = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    max_k = min(max(ks), len(xtr))
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test), batch):
        q = torch.from_numpy(np.ascontiguousarray(test[start : start + batch], dtype=np.float32))
        sims, idx = (q @ xtr.T).topk(max_k, dim=1)  # (B, max_k), sorted descending
        weights = torch.softmax(sims / temperature, dim=1)
        votes = torch.zeros(len(q), max_k, n_classes).scatter_(2, ytr[idx].unsqueeze(-1), weights.unsqueeze(-1))
        for k in ks:
            out[k].append(votes[:, : min(k, max_k)].sum(1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def knn_accuracy(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
    ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
) -> dict[str, float]:  # fmt: skip
    """Top-1 and top-5 accuracy (in %) for each k: {"top1_k20": ..., "top5_k20": ...}."""
    n_classes = int(max(train_labels.max(initial=0), test_labels.max(initial=0))) + 1
    scores = knn_scores(train, train_labels, test, ks, temperature, n_classes)
    y = np.asarray(test_labels)
    metrics = {}
    for k, s in scores.items():
        order = np.argsort(-s, axis=1, kind="stable")
        metrics[f"top1_k{k}"] = float((order[:, 0] == y).mean() * 100)
        top5 = order[:, : min(5, n_classes)]
        metrics[f"top5_k{k}"] = float((top5 == y[:, None]).any(1).mean() * 100)
    return metrics
