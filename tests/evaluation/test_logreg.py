import numpy as np
from sklearn.linear_model import LogisticRegression

from evaluation.logreg import c_grid, logistic_regression


def test_c_grid_is_the_reference_sweep():
    cs = c_grid()
    assert len(cs) == 45 and cs[0] == 1e-6 and cs[-1] == 1e5
    np.testing.assert_allclose(np.log10(cs), np.linspace(-6, 5, 45), rtol=0, atol=1e-12)


def test_selection_and_refit_match_a_cold_start_reference():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 5)) * 1.5
    ytr, yte = rng.integers(0, 3, 120), rng.integers(0, 3, 60)
    xtr = centers[ytr] + rng.normal(size=(120, 5))
    xte = centers[yte] + rng.normal(size=(60, 5))
    cs = c_grid(-4, 2, 7)
    res = logistic_regression(xtr, ytr, xte, yte, cs=cs, max_iter=500)
    # reference: cold-start fit per C on 90% of train, the best on the other 10% (seed 0), refit on all of train
    perm = np.random.default_rng(0).permutation(120)
    val, fit = np.sort(perm[:12]), np.sort(perm[12:])
    accs = [(LogisticRegression(C=c, max_iter=500, tol=1e-12).fit(xtr[fit], ytr[fit]).predict(xtr[val]) == ytr[val]).mean()
            for c in cs]
    best = float(cs[int(np.argmax(accs))])  # first maximum: the smallest C
    final = LogisticRegression(C=best, max_iter=500, tol=1e-12).fit(xtr, ytr)
    assert res.best_c == best
    assert res.val_top1 == {float(c): a * 100 for c, a in zip(cs, accs, strict=True)}
    assert res.test_top1 == (final.predict(xte) == yte).mean() * 100
    assert res.test_top5 == 100.0  # 3 classes
