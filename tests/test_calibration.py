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
    assert val["nll_platt"] < val["nll"] and report["evaluated"] == val


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
