import numpy as np
import pytest

from pneumo_eval.bootstrap import bootstrap_intervals


def sample(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    return y, np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)


@pytest.mark.slow
def test_intervals_contain_estimate_and_shrink_with_n():
    widths = []
    for n in (100, 1600):
        y, s = sample(n, 0)
        ci = bootstrap_intervals(y, s, 0.5, n_boot=300, seed=1)
        for key in ("accuracy", "sensitivity", "specificity", "roc_auc", "brier"):
            assert ci[key]["low"] <= ci[key]["estimate"] <= ci[key]["high"], key
        widths.append(ci["roc_auc"]["high"] - ci["roc_auc"]["low"])
    assert widths[1] < widths[0] / 2


@pytest.mark.slow
def test_patient_resampling_widens_intervals_for_correlated_images():
    # 50 patients with 8 near-identical images each: the image bootstrap pretends
    # there are 400 independent samples.
    rng = np.random.default_rng(3)
    y = np.repeat(rng.integers(0, 2, 50), 8)
    s = np.clip(np.repeat(rng.normal(0.4, 0.2, 50), 8) + 0.2 * y, 0, 1)
    patients = np.repeat(np.arange(50), 8)
    by_image = bootstrap_intervals(y, s, 0.5, n_boot=300, seed=0)
    by_patient = bootstrap_intervals(y, s, 0.5, groups=patients, n_boot=300, seed=0)
    def width(ci):
        return ci["accuracy"]["high"] - ci["accuracy"]["low"]

    assert width(by_patient) > 1.8 * width(by_image)
    assert by_patient["_meta"]["unit"] == "patient" and by_patient["_meta"]["clusters"] == 50


def test_undefined_metric_has_no_interval():
    ci = bootstrap_intervals([1, 1, 1, 1], [0.3, 0.6, 0.7, 0.9], 0.5, n_boot=20)
    assert np.isnan(ci["roc_auc"]["estimate"]) and np.isnan(ci["roc_auc"]["low"])
    assert ci["sensitivity"]["estimate"] == 0.75


def test_group_length_must_match():
    with pytest.raises(ValueError, match="one entry per example"):
        bootstrap_intervals([0, 1], [0.2, 0.8], 0.5, groups=[1])
