import math

import numpy as np
import pytest

from ich_model.metrics import (
    bootstrap_ci,
    calibration_table,
    roc_auc,
    sensitivity_specificity,
    weighted_log_loss,
)


def test_weighted_log_loss_by_hand():
    y = np.array([[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]], dtype=float)
    p = np.full((2, 6), 0.5)
    # every term is ln 2, weights sum to 7 per row
    assert weighted_log_loss(y, p) == pytest.approx(math.log(2))
    p2 = np.array([[0.1] * 6, [0.9, 0.1, 0.1, 0.1, 0.1, 0.8]])
    row1 = -math.log(0.9)  # all six terms equal
    row2 = (-math.log(0.9) + 4 * -math.log(0.9) + 2 * -math.log(0.8)) / 7
    assert weighted_log_loss(y, p2) == pytest.approx((row1 + row2) / 2)


def test_weighted_log_loss_any_counts_twice():
    y = np.zeros((1, 6))
    p = np.zeros((1, 6))
    p[0, 5] = 0.5
    assert weighted_log_loss(y, p) == pytest.approx(2 * math.log(2) / 7)


def test_weighted_log_loss_clips_at_1e_15():
    y = np.ones((1, 6))
    p = np.zeros((1, 6))
    assert weighted_log_loss(y, p) == pytest.approx(-math.log(1e-15))


def test_weighted_log_loss_shape_error():
    with pytest.raises(ValueError, match="6"):
        weighted_log_loss(np.zeros((2, 5)), np.zeros((2, 5)))


def test_roc_auc_by_hand():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_sensitivity_specificity_by_hand():
    sens, spec = sensitivity_specificity([1, 1, 1, 0, 0], [0.9, 0.6, 0.2, 0.7, 0.1], 0.5)
    assert sens == pytest.approx(2 / 3)
    assert spec == pytest.approx(1 / 2)


def test_bootstrap_ci_contains_point_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = y * 0.5 + rng.random(300)
    lo, hi = bootstrap_ci(y, s, n_boot=200)
    assert lo < roc_auc(y, s) < hi


def test_calibration_table_counts():
    t = calibration_table(np.array([0, 1, 1]), np.array([0.05, 0.95, 0.91]), bins=10)
    assert sum(b["n"] for b in t) == 3
    assert t[9]["n"] == 2 and t[9]["observed"] == 1.0
