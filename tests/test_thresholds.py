import numpy as np
import pytest

from pneumo_eval.thresholds import choose_threshold, parse_policy


def data(seed=0, n=400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    return y, s


def rates(y, s, t):
    p = s >= t
    return (p & (y == 1)).sum() / (y == 1).sum(), (~p & (y == 0)).sum() / (y == 0).sum()


def test_fixed():
    y, s = data()
    assert choose_threshold(y, s, "fixed").threshold == 0.5
    assert choose_threshold(y, s, "fixed:0.3").threshold == 0.3


def test_youden_maximises_j_over_all_cuts():
    y, s = data()
    c = choose_threshold(y, s, "youden")
    best = max(sum(rates(y, s, t)) for t in np.unique(s))
    assert sum(rates(y, s, c.threshold)) == pytest.approx(best)
    assert (c.sensitivity, c.specificity) == pytest.approx(rates(y, s, c.threshold))


def test_min_sensitivity_gives_best_specificity():
    y, s = data()
    c = choose_threshold(y, s, "sensitivity:0.95")
    sens, spec = rates(y, s, c.threshold)
    assert sens >= 0.95
    assert spec == max(rates(y, s, t)[1] for t in np.unique(s) if rates(y, s, t)[0] >= 0.95)


def test_bad_policies():
    for bad in ("median", "sensitivity", "sensitivity:1.5", "fixed:2", "youden:3"):
        with pytest.raises(ValueError):
            parse_policy(bad)
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1], [0.2, 0.3], "youden")
