"""Calibration of predicted probabilities: expected calibration error, temperature scaling and
Platt scaling, fitted on validation predictions.

* Temperature scaling (Guo et al. 2017): p -> sigmoid(logit(p) / T), one parameter fitted
  by minimising the validation negative log-likelihood. It sharpens (T < 1) or softens
  (T > 1) the scores but keeps p = 0.5 where it is, so it cannot correct a shift of the
  class prior.
* Platt scaling (Platt 1999): p -> sigmoid(a logit(p) + b), two parameters fitted the same
  way. The intercept b moves the prior. The issue-10 research found the small networks'
  miscalibration on val mostly a prior effect: training sees a balanced stream (50 %
  pneumonia), val holds about 74 %; temperature scaling could not fix that (for Adam/BCE
  runs it even raised ECE), Platt scaling brought ECE to 0.01-0.02 for every run.

Both maps are increasing, so neither changes which images lie above a threshold chosen on
the same validation scores: sensitivity and specificity at a val-chosen threshold are the
same before and after. They change the probabilities reported to users and the meaning of
a fixed cut such as 0.5.

ECE: ``bins`` equal-width bins of the predicted probability; the mean over images of
|mean predicted probability - fraction positive| of their bin.

A calibration fitted on val holds only at val's prevalence (issue 20: Platt fitted at 74 %
pneumonia, ECE 0.018 on a 74 % test split, 0.075 on the same images resampled to 40 %).
Under a change of prevalence alone (the same images per class, another mix) the Bayes
correction :func:`prior_shift` moves calibrated probabilities to the new prior; the new prior
can be estimated from the evaluated split's unlabelled scores by :func:`estimate_prevalence`
(EM of Saerens, Latinne and Decaestecker 2002). ``calibration_report`` shows the evaluated
split's ECE after Platt and after Platt plus that correction. A threshold on the raw scores
is a different matter: sensitivity and specificity at a fixed threshold do not depend on the
prevalence, so the val-chosen threshold needs no correction for it (measured in issue 20).
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-7
BINS = 15


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def nll(y, p) -> float:
    """Mean binary negative log-likelihood (natural log)."""
    y = np.asarray(y, np.float64)
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def ece(y, p, bins: int = BINS) -> float:
    """Expected calibration error over ``bins`` equal-width probability bins."""
    y = np.asarray(y, np.float64)
    p = np.asarray(p, np.float64)
    if y.size == 0:
        return math.nan
    index = np.clip((p * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.sum() * abs(p[members].mean() - y[members].mean())
    return float(total / y.size)


def fit_temperature(y, p) -> float:
    """T minimising the NLL of sigmoid(logit(p) / T) on (y, p), searched in [0.05, 20]."""
    from scipy.optimize import minimize_scalar
    z = logit(p)
    result = minimize_scalar(lambda log_t: nll(y, sigmoid(z / math.exp(log_t))),
                             bounds=(math.log(0.05), math.log(20.0)), method="bounded",
                             options={"xatol": 1e-6})
    return float(math.exp(result.x))


def fit_platt(y, p) -> tuple[float, float]:
    """(a, b) minimising the NLL of sigmoid(a logit(p) + b) on (y, p)."""
    from scipy.optimize import minimize
    z = logit(p)
    y = np.asarray(y, np.float64)

    def loss(ab):
        s = sigmoid(ab[0] * z + ab[1])
        return nll(y, s), np.array([np.mean((s - y) * z), np.mean(s - y)])

    result = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                      bounds=[(1e-3, 100.0), (-50.0, 50.0)])
    return float(result.x[0]), float(result.x[1])


def apply_temperature(p, temperature: float) -> np.ndarray:
    return sigmoid(logit(p) / temperature)


def apply_platt(p, a: float, b: float) -> np.ndarray:
    return sigmoid(a * logit(p) + b)


def prior_shift(p, from_prevalence: float, to_prevalence: float) -> np.ndarray:
    """Calibrated probabilities at prevalence ``from_prevalence`` moved to ``to_prevalence``
    (the class-conditional score distributions unchanged): a shift of the log-odds by the
    difference of the prior log-odds."""
    shift = logit(to_prevalence) - logit(from_prevalence)
    return sigmoid(logit(p) + shift)


def estimate_prevalence(p, prevalence: float, iterations: int = 200,
                        tolerance: float = 1e-7) -> float:
    """The prevalence of a population from unlabelled probabilities ``p`` calibrated at
    ``prevalence``: EM (Saerens et al. 2002), each step the mean of the probabilities moved
    to the current estimate."""
    p = np.asarray(p, np.float64)
    estimate = float(prevalence)
    for _ in range(iterations):
        new = float(np.mean(prior_shift(p, prevalence, estimate)))
        new = min(max(new, EPS), 1 - EPS)
        if abs(new - estimate) < tolerance:
            return new
        estimate = new
    return estimate


def _summary(y, p, temperature, platt, bins) -> dict[str, float]:
    return {"ece": ece(y, p, bins), "ece_temperature": ece(y, apply_temperature(p, temperature),
                                                           bins),
            "ece_platt": ece(y, apply_platt(p, *platt), bins),
            "nll": nll(y, p), "nll_temperature": nll(y, apply_temperature(p, temperature)),
            "nll_platt": nll(y, apply_platt(p, *platt)),
            "mean_probability": float(np.mean(p)), "positive_fraction": float(np.mean(y))}


def calibration_report(val_y, val_p, eval_y=None, eval_p=None, bins: int = BINS
                       ) -> dict[str, object]:
    """Temperature and Platt scaling fitted on val; ECE and NLL before and after, on val and
    (when given) on the evaluated split. Needs both classes in val."""
    val_y = np.asarray(val_y)
    if len(np.unique(val_y)) < 2:
        return {"undefined": "the val split needs both classes to fit a calibration"}
    temperature = fit_temperature(val_y, val_p)
    platt = fit_platt(val_y, val_p)
    out: dict[str, object] = {
        "fitted_on": "val", "bins": bins, "temperature": temperature,
        "platt": {"a": platt[0], "b": platt[1]},
        "val": _summary(val_y, val_p, temperature, platt, bins),
    }
    if eval_y is not None:
        evaluated = _summary(np.asarray(eval_y), eval_p, temperature, platt, bins)
        # Platt, then moved to the evaluated split's prevalence as estimated from its scores
        # (no labels used): what calibration can still mean when the prevalence differs
        val_prevalence = float(np.mean(val_y))
        calibrated = apply_platt(eval_p, *platt)
        estimated = estimate_prevalence(calibrated, val_prevalence)
        evaluated.update(
            estimated_prevalence=estimated,
            ece_platt_prior=ece(eval_y, prior_shift(calibrated, val_prevalence, estimated),
                                bins))
        out["evaluated"] = evaluated
    return out
