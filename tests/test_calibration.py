"""Calibration (ECE, temperature and Platt scaling) and test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_eval import calibration as cal
from pneumo_eval import tta
from pneumo_eval.thresholds import choose_threshold


def sample(n=20000, a=1.0, b=0.0, seed=0):
    """Scores p = sigmoid(z) whose true probability is sigmoid(a z + b)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.5, n)
    y = (rng.random(n) < cal.sigmoid(a * z + b)).astype(int)
    return y, cal.sigmoid(z)


def test_ece_on_known_cases():
    y, p = sample()
    assert cal.ece(y, p) < 0.02  # calibrated by construction
    assert cal.ece([0, 1, 0, 1], [0.9, 0.9, 0.9, 0.9]) == pytest.approx(0.4)
    assert cal.ece([1, 1], [1.0, 1.0]) == 0.0  # p = 1 falls in the last bin


def test_temperature_and_platt_recover_the_true_maps():
    y, p = sample(a=0.5)  # over-confident scores: T = 2
    assert cal.fit_temperature(y, p) == pytest.approx(2.0, rel=0.08)
    a, b = cal.fit_platt(*sample(a=1.6, b=1.2, seed=1))
    assert a == pytest.approx(1.6, rel=0.08) and b == pytest.approx(1.2, abs=0.1)


def test_a_prior_shift_needs_platt_not_temperature():
    """Scores from a balanced training stream on a 74 % positive split (issue 10)."""
    y, p = sample(b=np.log(0.74 / 0.26), seed=2)
    report = cal.calibration_report(y, p, y, p)
    val = report["val"]
    assert val["ece"] > 0.1 and val["ece_platt"] < 0.02
    assert val["ece_temperature"] > 5 * val["ece_platt"]
    assert report["platt"]["b"] == pytest.approx(np.log(0.74 / 0.26), abs=0.1)
    assert val["nll_platt"] < val["nll"]
    assert {k: v for k, v in report["evaluated"].items() if k in val} == val


def test_platt_fitted_on_val_holds_at_vals_prevalence_only_and_the_prior_correction_helps():
    """Issue 20: the same class-conditional scores at 74 % (val) and 40 % pneumonia."""
    rng = np.random.default_rng(4)

    def population(n, prevalence):
        y = (rng.random(n) < prevalence).astype(int)
        z = np.where(y == 1, rng.normal(1.5, 1.2, n), rng.normal(-1.5, 1.2, n))
        return y, cal.sigmoid(z)
    val_y, val_p = population(20000, 0.74)
    eval_y, eval_p = population(20000, 0.40)
    report = cal.calibration_report(val_y, val_p, eval_y, eval_p)
    val, evaluated = report["val"], report["evaluated"]
    assert val["ece_platt"] < 0.02 and evaluated["ece_platt"] > 0.08
    assert evaluated["estimated_prevalence"] == pytest.approx(0.40, abs=0.02)
    assert evaluated["ece_platt_prior"] < 0.02
    moved = cal.prior_shift(np.array([0.5, 0.9]), 0.74, 0.74)
    np.testing.assert_allclose(moved, [0.5, 0.9])
    assert cal.prior_shift(np.array([0.74]), 0.74, 0.5)[0] == pytest.approx(0.5)


def test_recalibration_keeps_the_val_operating_point():
    y, p = sample(a=0.7, b=0.8, seed=3)
    t = choose_threshold(y, p, "youden")
    for q in (cal.apply_temperature(p, 0.6), cal.apply_platt(p, 1.7, 0.9)):
        u = choose_threshold(y, q, "youden")
        assert (u.sensitivity, u.specificity) == (t.sensitivity, t.specificity)
        np.testing.assert_array_equal(p >= t.threshold, q >= u.threshold)


def test_one_class_is_reported_as_undefined():
    assert "undefined" in cal.calibration_report([1, 1, 1], [0.2, 0.7, 0.9])


def test_tta_views_and_means():
    assert tta.views("none") == [(False, 1.0)]
    assert len(tta.views("flip")) == 2 and len(tta.views("flip_scale")) == 6
    with pytest.raises(ValueError, match="tta"):
        tta.views("rotate")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 1)).astype(np.uint8)

    def left_half(x):  # a "model" that looks at the left half only
        return x[:, :, :16].mean(axis=(1, 2, 3)) / 255.0

    got = tta.tta_scores(left_half, images, "flip")
    np.testing.assert_allclose(got, images.mean(axis=(1, 2, 3)) / 255.0)
    np.testing.assert_array_equal(tta.tta_scores(left_half, images, "none"), left_half(images))
    assert tta.scaled(images, 1.0) is images
    # scale 0.9 zooms in: a centred bright disc grows; 1.1 zooms out: it shrinks
    ys, xs = np.mgrid[0:33, 0:33]
    disc = (((ys - 16) ** 2 + (xs - 16) ** 2) < 64).astype(np.uint8)[None, ..., None] * 255
    area = [(tta.scaled(disc, s) > 127).sum() for s in (0.9, 1.0, 1.1)]
    assert area[0] > area[1] > area[2]
    assert tta.scaled(disc, 0.9).dtype == np.uint8


def test_the_report_says_a_val_fitted_calibration_holds_at_vals_prevalence_only():
    """The report's calibration table (pneumo_models.report renders it) carries the caveat,
    the evaluated split's ECE after Platt + prior correction and its estimated prevalence."""
    from pneumo_models import report as report_lib
    rng = np.random.default_rng(5)
    y = (rng.random(4000) < 0.74).astype(int)
    p = cal.sigmoid(np.where(y == 1, rng.normal(1.5, 1.2, y.size), rng.normal(-1.5, 1.2, y.size)))
    calibration = cal.calibration_report(y, p, y[:2000], p[:2000])
    text = "\n".join(report_lib._calibration_lines(calibration))
    assert "holds only at val's prevalence" in text and "Saerens" in text
    assert "after Platt + prior correction" in text
    evaluated = calibration["evaluated"]
    row = [line for line in text.splitlines() if line.startswith("| evaluated split")][0]
    assert f"{evaluated['ece_platt_prior']:.3f}" in row
    assert f"({evaluated['estimated_prevalence']:.3f})" in row
    val_row = [line for line in text.splitlines() if line.startswith("| val (fitted")][0]
    assert "| - |" in val_row  # no prior correction on the split it was fitted on
