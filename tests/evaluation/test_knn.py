import numpy as np

from evaluation.knn import knn_accuracy, knn_scores


def _naive(train, ytr, test, k, t, n_classes):
    """float64 loops: the dinov2 protocol written out directly."""
    preds = []
    for q in test.astype(np.float64):
        sims = train.astype(np.float64) @ q
        top = np.argsort(-sims, kind="stable")[:200]
        w = np.exp(sims[top] / t)
        w /= w.sum()
        score = np.zeros(n_classes)
        for j in range(min(k, len(top))):
            score[ytr[top[j]]] += w[j]
        preds.append(np.argsort(-score, kind="stable")[:5])
    return np.array(preds)


def test_knn_matches_bruteforce_float64_reference():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16))
    ytr, yte = rng.integers(0, 4, 300), rng.integers(0, 4, 80)
    train = centers[ytr] + rng.normal(scale=1.5, size=(300, 16))
    test = centers[yte] + rng.normal(scale=1.5, size=(80, 16))
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    for k in (10, 20, 100, 200):
        scores = knn_scores(train, ytr, test, [10, 20, 100, 200], 0.07, 4)[k]
        ref = _naive(train, ytr, test, k, 0.07, 4)
        np.testing.assert_array_equal(np.argsort(-scores, axis=1, kind="stable")[:, 0], ref[:, 0])
    acc = knn_accuracy(train, ytr, test, yte)
    ref20 = _naive(train, ytr, test, 20, 0.07, 4)
    assert acc["top1_k20"] == (ref20[:, 0] == yte).mean() * 100
    assert acc["top5_k20"] == 100.0  # 4 classes: the true class is always within the top 5
