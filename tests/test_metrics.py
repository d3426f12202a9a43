import math

import numpy as np
import pytest
from sklearn import metrics as skm

from pneumo_eval.metrics import binary_metrics, json_ready, subtype_sensitivity, undefined_reasons


def sklearn_reference(y, s, t):
    pred = (s >= t).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    nan = np.nan
    both = len(set(y)) == 2
    return dict(
        tn=tn, fp=fp, fn=fn, tp=tp,
        accuracy=skm.accuracy_score(y, pred),
        precision=skm.precision_score(y, pred, zero_division=nan),
        sensitivity=skm.recall_score(y, pred, zero_division=nan),
        specificity=skm.recall_score(1 - np.asarray(y), 1 - pred, zero_division=nan),
        npv=skm.precision_score(1 - np.asarray(y), 1 - pred, zero_division=nan),
        f1=skm.f1_score(y, pred, zero_division=nan),
        roc_auc=skm.roc_auc_score(y, s) if both else nan,
        pr_auc=skm.average_precision_score(y, s) if sum(y) else nan,
        brier=skm.brier_score_loss(y, s, pos_label=1) if both else np.mean((s - y) ** 2),
    )


CASES = []
rng = np.random.default_rng(0)
for n in (5, 50, 500):
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    CASES.append((y, np.clip(rng.normal(0.3 + 0.4 * y, 0.25), 0, 1), 0.5))
CASES += [
    (np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]), 0.5),
    (np.array([0, 1, 1]), np.array([0.2, 0.2, 0.9]), 0.2),       # ties at the threshold
    (np.array([0, 1, 0, 1]), np.array([0.0, 0.0, 1.0, 1.0]), 1.0),
    (np.array([1, 1, 1]), np.array([0.2, 0.7, 0.9]), 0.5),       # one class only
    (np.array([0, 0, 0]), np.array([0.2, 0.7, 0.1]), 0.5),
    (np.array([0, 1, 1, 0]), np.array([0.1, 0.2, 0.3, 0.4]), 0.99),  # nothing positive
]


@pytest.mark.parametrize("y,s,t", CASES)
def test_every_metric_matches_sklearn(y, s, t):
    ours = binary_metrics(y, s, t)
    for key, want in sklearn_reference(y, s, t).items():
        got = ours[key]
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(got), key
        else:
            assert got == pytest.approx(float(want), abs=1e-12), key


def test_single_class_marks_auc_undefined_without_crashing():
    result = binary_metrics([1, 1, 1], [0.2, 0.7, 0.9], 0.5)
    reasons = undefined_reasons(result)
    assert "only one class" in reasons["roc_auc"] and "specificity" in reasons
    assert json_ready(result)["roc_auc"] is None


@pytest.mark.parametrize("y,s,t,match", [
    ([0, 1], [0.5], 0.5, "differ in length"),
    ([], [], 0.5, "empty"),
    ([0, 1], [0.5, float("nan")], 0.5, "NaN"),
    ([0, 2], [0.5, 0.5], 0.5, "0 or 1"),
    ([0, 1], [0.5, 1.5], 0.5, r"\[0, 1\]"),
    ([0, 1], [0.5, 0.5], 1.5, "threshold must be"),
    ([0, 1], [0.5, 0.5], -0.1, "threshold must be"),
])
def test_bad_inputs_are_clear_errors(y, s, t, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(y, s, t)


def test_subtype_sensitivity():
    y = [1, 1, 1, 1, 0]
    s = [0.9, 0.2, 0.8, 0.7, 0.9]
    sub = ["bacterial", "bacterial", "viral", "viral", "none"]
    out = subtype_sensitivity(y, s, sub, 0.5)
    assert out == {"bacterial": {"positives": 2, "detected": 1, "sensitivity": 0.5},
                   "viral": {"positives": 2, "detected": 2, "sensitivity": 1.0}}
