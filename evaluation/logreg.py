"""Logistic regression on frozen features (dinov2 ``eval/log_regression.py`` protocol), the cheap alternative.

Multinomial L2-regularised logistic regression fitted with L-BFGS in float64 (the reference uses cuML; here
scikit-learn's ``lbfgs`` solver, the same objective). C is swept over 10^linspace(-6, 5, 45) on a random 10% of
train held out (seed 0); the best C is refitted on all of train and reported on test. The sweep runs from small
to large C with warm starts (each fit starts from the previous optimum; the objective is strictly convex, so the
optimum is the same as from a cold start, only reached sooner).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from evaluation.linear import holdout_split


@dataclass
class LogRegResult:
    best_c: float
    val_top1: dict[float, float]  # every C
    test_top1: float
    test_top5: float


def c_grid(c_min_exp: float = -6.0, c_max_exp: float = 5.0, n: int = 45) -> np.ndarray:
    return 10.0 ** np.linspace(c_min_exp, c_max_exp, n)


def _model(c: float, max_iter: int, tol: float, warm: bool) -> LogisticRegression:
    return LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, tol=tol, warm_start=warm)


def _fit(model: LogisticRegression, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol=1e-12 rarely "converges"; max_iter bounds it
        return model.fit(x, y)


def _topk(proba: np.ndarray, classes: np.ndarray, y: np.ndarray, k: int) -> float:
    top = classes[np.argsort(-proba, axis=1, kind="stable")[:, : min(k, proba.shape[1])]]
    return float((top == y[:, None]).any(1).mean() * 100)


def logistic_regression(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
    cs: np.ndarray | None = None, val_fraction: float = 0.1, max_iter: int = 1000, tol: float = 1e-12, seed: int = 0,
) -> LogRegResult:  # fmt: skip
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    cs = c_grid() if cs is None else np.asarray(cs, np.float64)
    fit_idx, val_idx = holdout_split(len(x_train), val_fraction, seed)
    model = _model(float(cs[0]), max_iter, tol, warm=True)
    val_top1: dict[float, float] = {}
    best_c, best_acc = float(cs[0]), -1.0
    for c in np.sort(cs):
        model.set_params(C=float(c))
        _fit(model, x_train[fit_idx], y_train[fit_idx])
        acc = float((model.predict(x_train[val_idx]) == y_train[val_idx]).mean() * 100)
        val_top1[float(c)] = acc
        if acc > best_acc:  # ties: the smallest C (strongest regularisation)
            best_c, best_acc = float(c), acc
    final = _fit(_model(best_c, max_iter, tol, warm=False), x_train, y_train)
    proba = final.predict_proba(x_test)
    return LogRegResult(best_c, val_top1, _topk(proba, final.classes_, y_test, 1), _topk(proba, final.classes_, y_test, 5))
