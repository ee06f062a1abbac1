"""Per-label Platt scaling, fitted honestly, and folded into the network's output layer.

A network trained on balanced batches from few thousand slices ranks well before it is
calibrated: its probabilities are too confident. Platt scaling fits, per label,
``p' = sigmoid(a * logit(p) + b)`` on held-out predictions. Because ``logit(p)`` is the
output layer's pre-activation ``W x + c``, the fitted map folds into that layer
(``W' = a W``, ``c' = a c + b``): the exported weights give calibrated probabilities with
no extra step at inference.

To report metrics that the calibration itself did not see, the validation patients are
split into two folds; each fold is calibrated with parameters fitted on the other
(cross-fitting). The parameters installed with the weights are then fitted on all of it.
"""

from __future__ import annotations

import hashlib

import numpy as np

EPS = 1e-7


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


def fit_platt(
    z: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 100
) -> tuple[float, float]:
    """(a, b) minimising the log loss of ``sigmoid(a z + b)``, shrunk towards (1, 0).

    Newton's method with a backtracking line search on two parameters; the ridge term
    ``l2 * ((a-1)^2 + b^2) / 2`` keeps labels with a handful of positives from being
    pushed to extremes.
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = np.stack([z, np.ones_like(z)], axis=1)
    prior = np.array([1.0, 0.0])

    def objective(t: np.ndarray) -> float:
        m = x @ t
        # log(1 + exp(-m)) for positives, log(1 + exp(m)) for negatives, computed stably
        nll = np.logaddexp(0.0, np.where(y > 0.5, -m, m)).sum()
        return float(nll + 0.5 * l2 * np.sum((t - prior) ** 2))

    theta = prior.copy()
    f = objective(theta)
    for _ in range(iters):
        p = sigmoid(np.clip(x @ theta, -500, 500))
        grad = x.T @ (p - y) + l2 * (theta - prior)
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:
            cand = theta - t * step
            fc = objective(cand)
            if fc <= f:
                break
            t *= 0.5
        else:
            break
        theta, f_old, f = cand, f, fc
        if abs(f_old - f) < 1e-10 * max(1.0, abs(f)):
            break
    return float(theta[0]), float(theta[1])


def fit_all(p: np.ndarray, y: np.ndarray, l2: float = 1.0) -> np.ndarray:
    """Platt parameters for every label: array ``[n_labels, 2]`` of (a, b)."""
    z = logit(p)
    return np.array([fit_platt(z[:, k], y[:, k], l2) for k in range(p.shape[1])])


def apply(p: np.ndarray, params: np.ndarray) -> np.ndarray:
    z = logit(p)
    return sigmoid(z * params[:, 0] + params[:, 1]).astype(np.float32)


def _fold_of(group: str) -> int:
    return hashlib.sha256(group.encode("utf-8")).digest()[0] % 2


def cross_fitted(p: np.ndarray, y: np.ndarray, groups: np.ndarray, l2: float = 1.0) -> np.ndarray:
    """Calibrated predictions where no slice's own patient helped fit its calibration."""
    folds = np.asarray([_fold_of(str(g)) for g in groups])
    out = np.empty_like(p, dtype=np.float32)
    for f in (0, 1):
        fit_on = folds != f
        if not fit_on.any() or fit_on.all():  # one fold only: no honest calibration possible
            return np.asarray(p, dtype=np.float32)
        out[folds == f] = apply(p[folds == f], fit_all(p[fit_on], y[fit_on], l2))
    return out


def fold_into_dense(
    kernel: np.ndarray, bias: np.ndarray, params: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The output layer's weights with the calibration folded in."""
    a, b = params[:, 0], params[:, 1]
    return (kernel * a[None, :]).astype(kernel.dtype), (bias * a + b).astype(bias.dtype)
