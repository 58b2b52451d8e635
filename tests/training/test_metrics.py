from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    binary_metrics,
    bootstrap_auc,
    bootstrap_aucs,
    calibration,
    predictive_values,
)


def test_predictive_values_follow_bayes() -> None:
    pv = predictive_values(0.95, 0.95, 0.01)
    assert pv["ppv"] == pytest.approx(0.95 * 0.01 / (0.95 * 0.01 + 0.05 * 0.99))
    assert pv["npv"] == pytest.approx(0.95 * 0.99 / (0.95 * 0.99 + 0.05 * 0.01))
    assert predictive_values(1.0, 1.0, 0.2) == {"prevalence": 0.2, "ppv": 1.0, "npv": 1.0}


def test_calibration_error_is_zero_when_calibrated_and_large_when_not() -> None:
    y = np.array([0] * 8 + [1] * 2 + [1] * 8 + [0] * 2)
    p = np.array([0.2] * 10 + [0.8] * 10)
    assert calibration(y, p)["ece"] == pytest.approx(0.0)
    assert calibration(y, 1 - p)["ece"] == pytest.approx(0.6)


def test_binary_metrics_counts_and_interval() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0] * 200 + [1] * 100)
    p = np.clip(np.where(y == 1, 0.7, 0.3) + rng.normal(0, 0.15, len(y)), 0, 1)
    m = binary_metrics(y, p, 0.5, 500, 0)
    cm = m["confusion_matrix"]
    assert cm["tp"] + cm["fn"] == 100 and cm["tn"] + cm["fp"] == 200
    assert m["sensitivity"] == pytest.approx(cm["tp"] / 100)
    lo, hi = m["auc_ci95"]
    assert lo < m["auc"] < hi and hi - lo < 0.1
    assert [pv["prevalence"] for pv in m["predictive_values"]] == [0.01, 0.05, 0.2]
    assert "covid" in m["classification_report_text"]
    assert bootstrap_auc(y, p, 200, 1) == bootstrap_auc(y, p, 200, 1)


def test_the_interval_rests_on_as_many_resamples_as_reported() -> None:
    """Resamples without a covid film were skipped, so a small site folder's interval
    came from about two thirds of the resamples the report named."""
    y = np.array([1] + [0] * 20)
    p = np.linspace(0, 1, len(y))
    assert len(bootstrap_aucs(y, p, 300, 0)) == 300
