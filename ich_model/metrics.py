"""The RSNA 2019 metric and the usual binary-classifier measures, in plain numpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ich_model.labels import LABELS, METRIC_WEIGHTS

EPS = 1e-15


def weighted_log_loss(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    weights: Sequence[float] = METRIC_WEIGHTS,
) -> float:
    """RSNA 2019 weighted multi-label log loss.

    For each row (slice) the weighted mean over labels of the binary cross-entropy,
    with weight 2 for "any" and 1 for each subtype; then the mean over rows.
    Probabilities are clipped to [1e-15, 1 - 1e-15] as in the challenge.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(y_pred, dtype=np.float64), EPS, 1.0 - EPS)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(weights):
        raise ValueError(
            f"y_true and y_pred must both be [n, {len(weights)}]. Received: {y.shape} and {p.shape}"
        )
    if len(y) == 0:
        raise ValueError("no rows to score")
    w = np.asarray(weights, dtype=np.float64)
    bce = -(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))
    return float(np.mean((bce * w).sum(axis=1) / w.sum()))


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted as one half); NaN if one class."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = int(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def sensitivity_specificity(
    y_true: np.ndarray, score: np.ndarray, threshold: float
) -> tuple[float, float]:
    """(sensitivity, specificity) calling positive every score >= threshold; NaN where undefined."""
    y = np.asarray(y_true).astype(bool).ravel()
    pred = np.asarray(score, dtype=np.float64).ravel() >= threshold
    tp = int(np.sum(pred & y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    fp = int(np.sum(pred & ~y))
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return sens, spec


def per_label_auc(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {lab: roc_auc(y_true[:, i], y_pred[:, i]) for i, lab in enumerate(LABELS)}


def bootstrap_ci(
    y_true: np.ndarray,
    score: np.ndarray,
    stat: str = "auc",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a per-label AUC (``stat='auc'``)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y_true).ravel()
    s = np.asarray(score).ravel()
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        v = roc_auc(y[idx], s[idx])
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def calibration_table(
    y_true: np.ndarray, score: np.ndarray, bins: int = 10
) -> list[dict[str, float]]:
    """Per probability bin: count, mean predicted probability, observed positive fraction."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(s, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        out.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": n,
                "mean_predicted": float(s[m].mean()) if n else float("nan"),
                "observed": float(y[m].mean()) if n else float("nan"),
            }
        )
    return out
