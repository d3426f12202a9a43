"""Planning a training time budget before training, from a quick measurement (issue 20).

The training job's :class:`pneumo_models.callbacks.TimeBudget` learns the epoch time after
the first epoch and shortens the cosine: on a slow CPU the first epoch is already a third of
a 13-minute budget, and it can only cut epochs, never the image size. ``--budget_plan=probe``
plans first:

1. :func:`pneumo_models.probe.probe_step_seconds` times a few training steps of a throwaway
   copy of the network at the configured image size (after its compilation and warm-up
   steps): about 10 steps, a few percent of a 13-minute budget on a 2-core CPU.
2. :func:`plan_budget` predicts the epoch time at each candidate image size plus the
   validation pass from the measured step times (:func:`step_seconds_at`: one measurement
   scales with the pixel count; two or more fit ``a + b size^2``, the constant being the
   per-step cost that does not shrink with the image), and chooses what to cut by what
   costs the least quality: first the epochs above ``min_epochs``, then the image size down
   the ``sizes`` ladder while at least ``min_epochs`` still do not fit, and only then epochs
   below ``min_epochs`` (the most that fit, at the largest size that fits them).
3. When the plan takes a smaller size, the job times that size too and plans again from
   both measurements (:func:`pneumo_models.probe.plan_from_probe`).

The order and the floor of 5 epochs are a judgement the issue-20 runs support only in part
(benchmarks/results/generalisation.md): 5 epochs at 128 px scored as well as 5 at 150 px
(resplit test AUC 0.9905 against 0.9892, one seed), and issue 10 saw fewer epochs cost
robustness (8 instead of 12: worst-shift specificity 0.36 instead of 0.58-0.60); fewer
epochs at full size against 5 at a smaller size was not measured. On other data, measure
again.

Plain arithmetic: no TensorFlow here (the probe is :mod:`pneumo_models.probe`'s).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

DEFAULT_SIZES = (150, 128, 112)
DEFAULT_MIN_EPOCHS = 5
VAL_COST = 1.0 / 3.0  # a forward pass costs about a third of a training step per image


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """What fits: ``epochs`` epochs at ``image_size`` px, predicted to take ``seconds``."""

    image_size: int
    epochs: int
    epoch_seconds: float
    seconds: float
    reason: str

    def as_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v)
                for k, v in dataclasses.asdict(self).items()}


def step_seconds_at(size: int, measured: dict[int, float]) -> float:
    """A training step's time at ``size`` px from ``measured`` ({size: seconds per step}).

    One measurement: scaled with the pixel count (the convolutions' work). Two or more: the
    least-squares fit of ``a + b size^2`` with ``a, b >= 0``. Measured on the AVX2 EPYC of
    issue 20, the pixel rule alone predicted 128 img/s at 112 px from 0.45 s per step at
    150 px; the job then ran at 73 img/s (augmentation, the optimizer update and dispatch do
    not shrink with the image), hence the second probe at a smaller candidate size."""
    if not measured:
        raise ValueError("no measured step time")
    if len(measured) == 1:
        (m_size, m_seconds), = measured.items()
        return m_seconds * (size / m_size) ** 2
    xs = [float(k) ** 2 for k in measured]
    ys = list(measured.values())
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    a = my - b * mx
    if a < 0:  # no constant part: through the origin
        a, b = 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return a + b * size ** 2


def epoch_seconds_at(size: int, *, measured: dict[int, float], steps_per_epoch: int,
                     val_images: int, batch_size: int) -> float:
    step = step_seconds_at(size, measured)
    val = math.ceil(val_images / batch_size) * step * VAL_COST
    return steps_per_epoch * step + val


def plan_budget(minutes: float, *, epochs: int, image_size: int,
                step_seconds: float | dict[int, float], steps_per_epoch: int, val_images: int,
                batch_size: int, sizes: Sequence[int] = DEFAULT_SIZES,
                min_epochs: int = DEFAULT_MIN_EPOCHS, overhead_seconds: float = 0.0,
                margin: float = 1.0) -> BudgetPlan:
    """The (image size, epochs) to train within ``minutes``.

    Args:
      epochs: the epochs wanted (at most this many are planned).
      image_size: the configured size, where ``step_seconds`` was measured; only sizes of
        ``sizes`` at or below it are candidates (it is always one).
      step_seconds: measured seconds per training step at ``image_size``, or
        {size: seconds} measured at several sizes (see :func:`step_seconds_at`).
      min_epochs: the fewest epochs worth keeping a resolution for (see the module doc).
      overhead_seconds: time spent before the first step (compilation, the probe itself).
      margin: predicted epoch times are multiplied by this (e.g. 1.1 for a shared machine).
    """
    if minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    measured = step_seconds if isinstance(step_seconds, dict) else {image_size: step_seconds}
    if epochs < 1 or steps_per_epoch < 1 or min(measured.values()) <= 0:
        raise ValueError("epochs, steps_per_epoch and step_seconds must be positive")
    budget = minutes * 60.0 - overhead_seconds
    ladder = sorted({image_size, *(s for s in sizes if s < image_size)}, reverse=True)
    floor = min(min_epochs, epochs)

    def fit(size):
        per_epoch = margin * epoch_seconds_at(size, measured=measured,
                                              steps_per_epoch=steps_per_epoch,
                                              val_images=val_images, batch_size=batch_size)
        return min(epochs, max(0, int(budget // per_epoch))), per_epoch

    for size in ladder:
        n, per_epoch = fit(size)
        if n >= floor:
            if size == image_size:
                reason = (f"{n} of {epochs} epochs fit at {size} px" if n < epochs
                          else f"all {epochs} epochs fit at {size} px")
            else:
                reason = (f"fewer than {floor} epochs fit at {image_size} px; {n} epochs fit "
                          f"at {size} px")
            return BudgetPlan(size, n, per_epoch, n * per_epoch, reason)
    # none keeps the floor: the most epochs, at the largest size that gives them
    options = [(fit(size), size) for size in ladder]
    (n, per_epoch), size = max(options, key=lambda o: (o[0][0], o[1]))
    n = max(1, n)
    return BudgetPlan(size, n, per_epoch, n * per_epoch,
                      f"fewer than {floor} epochs fit even at {ladder[-1]} px; {n} planned at "
                      f"{size} px")
