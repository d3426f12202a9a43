"""Binary screening metrics from labels and scores, with undefined values marked.

A value that is undefined for the input (a 0/0 ratio, an AUC with one class
present) is ``nan`` here and ``null`` in JSON, and :func:`undefined_reasons`
says why; nothing is silently reported as 0. Decision rule everywhere:
positive when ``score >= threshold`` (as ``sklearn.metrics.roc_curve``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from sklearn import metrics as skm

from pneumo_models.report import check_threshold

METRICS = ("accuracy", "precision", "sensitivity", "specificity", "npv", "f1", "roc_auc",
           "pr_auc", "brier")


def validate(y_true, scores, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Checked numpy copies: labels in {0, 1}, finite scores in [0, 1], same length."""
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.size == 0:
        raise ValueError("no examples: labels and scores are empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(y)[:10].tolist()}")
    bad = ~np.isfinite(s)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} score(s) are NaN or infinite "
                         f"(first at index {int(np.argmax(bad))})")
    if s.min() < 0 or s.max() > 1:
        raise ValueError(f"scores must be probabilities in [0, 1], got [{s.min()}, {s.max()}]")
    if threshold is not None:
        check_threshold(threshold)
    return y.astype(np.int64), s


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def confusion(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, int]:
    pred = s >= threshold
    pos = y == 1
    return {"tn": int((~pred & ~pos).sum()), "fp": int((pred & ~pos).sum()),
            "fn": int((~pred & pos).sum()), "tp": int((pred & pos).sum())}


def binary_metrics(y_true, scores, threshold: float = 0.5) -> dict[str, float | int]:
    """Counts and every metric of METRICS at ``threshold`` (nan where undefined)."""
    y, s = validate(y_true, scores, threshold)
    c = confusion(y, s, threshold)
    tn, fp, fn, tp = c["tn"], c["fp"], c["fn"], c["tp"]
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    both = len(np.unique(y)) == 2
    result: dict[str, float | int] = dict(c)
    result.update(
        n=int(y.size), positives=int(y.sum()), threshold=float(threshold),
        accuracy=(tp + tn) / y.size,
        precision=precision,
        sensitivity=sensitivity,
        specificity=_ratio(tn, tn + fp),
        npv=_ratio(tn, tn + fn),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        roc_auc=float(skm.roc_auc_score(y, s)) if both else math.nan,
        pr_auc=float(skm.average_precision_score(y, s)) if y.sum() > 0 else math.nan,
        brier=float(np.mean((s - y) ** 2)),
    )
    return result


def undefined_reasons(result: dict[str, float]) -> dict[str, str]:
    """Why each nan metric in ``result`` is undefined."""
    reasons = {}
    why = {
        "precision": "no example was predicted positive (TP + FP = 0)",
        "sensitivity": "no positive example (TP + FN = 0)",
        "specificity": "no negative example (TN + FP = 0)",
        "npv": "no example was predicted negative (TN + FN = 0)",
        "f1": "no positive example and no positive prediction",
        "roc_auc": "only one class is present, so the ROC curve is undefined",
        "pr_auc": "no positive example, so precision-recall is undefined",
    }
    for key, text in why.items():
        value = result.get(key)
        if isinstance(value, float) and math.isnan(value):
            reasons[key] = text
    return reasons


def subtype_sensitivity(y_true, scores, subtypes: Sequence[str], threshold: float
                        ) -> dict[str, dict[str, float | int]]:
    """Sensitivity among the positives of each subtype (bacterial, viral, ...)."""
    y, s = validate(y_true, scores, threshold)
    subtypes = np.asarray(subtypes)
    if subtypes.shape != y.shape:
        raise ValueError("subtypes must have one entry per example")
    out = {}
    for name in sorted(set(subtypes[y == 1].tolist())):
        mask = (y == 1) & (subtypes == name)
        detected = int((s[mask] >= threshold).sum())
        out[str(name)] = {"positives": int(mask.sum()), "detected": detected,
                          "sensitivity": detected / int(mask.sum())}
    return out


def json_ready(value):
    """nan/inf become None, numpy scalars become Python numbers (recursively)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
