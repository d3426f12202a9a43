"""Bootstrap confidence intervals that resample patients, not images.

Images of one patient are correlated; resampling images as if independent
makes intervals too narrow. With ``groups`` (patient ids) each replicate draws
patients with replacement and takes all their images (a cluster bootstrap);
without, it draws images. Intervals are percentile intervals; a replicate in
which a metric is undefined (say, no positives drawn) is left out of that
metric's interval, and the count of defined replicates is reported.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from pneumo_eval.metrics import METRICS, binary_metrics, validate


def bootstrap_intervals(y_true, scores, threshold: float, groups: Sequence | None = None,
                        n_boot: int = 1000, seed: int = 0, level: float = 0.95
                        ) -> dict[str, dict[str, float]]:
    """For every metric of METRICS: estimate, low, high, and defined replicates."""
    y, s = validate(y_true, scores, threshold)
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if groups is None:
        members = [np.array([i]) for i in range(y.size)]
    else:
        groups = np.asarray(groups)
        if groups.shape != y.shape:
            raise ValueError("groups must have one entry per example")
        _, inverse = np.unique(groups, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        members = np.split(order, bounds)
    rng = np.random.default_rng(seed)
    samples = {m: [] for m in METRICS}
    for _ in range(n_boot):
        picked = rng.integers(0, len(members), len(members))
        index = np.concatenate([members[g] for g in picked])
        replicate = binary_metrics(y[index], s[index], threshold)
        for m in METRICS:
            samples[m].append(replicate[m])
    point = binary_metrics(y, s, threshold)
    tail = (1 - level) / 2
    out = {}
    for m in METRICS:
        values = np.array(samples[m], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0 or not math.isfinite(point[m]):
            low = high = math.nan
        else:
            low, high = np.quantile(values, [tail, 1 - tail])
        out[m] = {"estimate": float(point[m]), "low": float(low), "high": float(high),
                  "defined_replicates": int(values.size)}
    out["_meta"] = {"n_boot": n_boot, "level": level, "seed": seed,
                    "unit": "patient" if groups is not None else "image",
                    "clusters": len(members)}
    return out
