"""Operating thresholds chosen on validation predictions, then applied unchanged.

Policies (the string form is what ``--threshold_policy`` takes):

* ``fixed`` or ``fixed:T``: the threshold T (0.5 by default).
* ``youden``: maximises Youden's J = sensitivity + specificity - 1.
* ``sensitivity:S``: the highest specificity among thresholds whose
  sensitivity is at least S (for screening, e.g. ``sensitivity:0.95``); ties go
  to the higher sensitivity, then the higher threshold.

Candidate thresholds are the distinct validation scores (positive when
``score >= threshold``), so each policy's choice is exactly reproducible.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.metrics import roc_curve

from pneumo_eval.metrics import validate
from pneumo_models.report import check_threshold


@dataclasses.dataclass(frozen=True)
class Choice:
    policy: str
    threshold: float
    sensitivity: float  # on the data it was chosen on
    specificity: float
    chosen_on: str = "val"


def parse_policy(spec: str) -> tuple[str, float | None]:
    name, _, arg = spec.partition(":")
    if name == "fixed":
        return name, check_threshold(float(arg)) if arg else 0.5
    if name == "youden" and not arg:
        return name, None
    if name == "sensitivity" and arg:
        value = float(arg)
        if not 0 < value <= 1:
            raise ValueError(f"sensitivity target must be in (0, 1], got {value}")
        return name, value
    raise ValueError(f"unknown threshold policy {spec!r}; use fixed[:T], youden or "
                     f"sensitivity:S")


def _rates(y: np.ndarray, s: np.ndarray, t: float) -> tuple[float, float]:
    pred = s >= t
    pos = y == 1
    return float((pred & pos).sum() / pos.sum()), float((~pred & ~pos).sum() / (~pos).sum())


def choose_threshold(y_true, scores, policy: str, chosen_on: str = "val") -> Choice:
    """Applies ``policy`` to validation labels and scores."""
    name, arg = parse_policy(policy)
    y, s = validate(y_true, scores)
    if name != "fixed" and len(np.unique(y)) < 2:
        raise ValueError(f"policy {policy!r} needs both classes in the {chosen_on} split")
    if name == "fixed":
        t = arg
    else:
        fpr, tpr, cut = roc_curve(y, s, drop_intermediate=False)
        cut = np.minimum(cut, 1.0)  # the first cut is +inf: nothing positive
        if name == "youden":
            j = tpr - fpr
            best = np.flatnonzero(j == j.max())
            t = float(cut[best].max())
        else:
            ok = np.flatnonzero(tpr >= arg - 1e-12)
            spec = 1 - fpr[ok]
            best = ok[spec == spec.max()]
            best = best[tpr[best] == tpr[best].max()]
            t = float(cut[best].max())
    if len(np.unique(y)) == 2:
        sens, spec = _rates(y, s, t)
    else:
        sens = spec = float("nan")
    return Choice(policy=policy, threshold=float(t), sensitivity=sens, specificity=spec,
                  chosen_on=chosen_on)
