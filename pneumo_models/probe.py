"""Timing a few training steps of a throwaway network before training: the measurement behind
``--budget_plan=probe`` (issue 20). :mod:`pneumo_models.budget` plans from it, without
TensorFlow; this module runs the steps.

:func:`plan_from_probe` builds a throwaway copy of the job's network at the configured image
size, times :func:`probe_step_seconds` on one batch of the training stream, asks
:func:`pneumo_models.budget.plan_budget` for (image size, epochs), and when the plan takes a
smaller size, times that size too (the batch resized by stage (b), as the reader would) and
plans again from both. Every worker of a cluster uses the chief's plan.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import numpy as np
import tensorflow as tf

from pneumo_data.preprocess.model_input_tf import to_model_input
from pneumo_models import budget, cluster, models, optim

log = logging.getLogger("pneumo.train")

MARGIN = 1.1  # the real run compiles once more and runs on a machine whose load can change


def probe_step_seconds(model, images, labels, optimizer, loss, *, steps: int = 8,
                       warmup: int = 2) -> tuple[float, float, float]:
    """(median seconds per training step over ``steps`` timed steps, seconds spent in all,
    seconds of the first call: tracing and the first step) for ``model`` on one batch
    (``images``, ``labels``), with ``optimizer`` and ``loss``. Train a throwaway copy: its
    weights change."""
    start = time.perf_counter()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return value

    x, y = tf.constant(images), tf.constant(labels)
    first = time.perf_counter()
    step(x, y).numpy()
    first = time.perf_counter() - first
    for _ in range(max(1, warmup) - 1):
        step(x, y).numpy()
    times = []
    for _ in range(max(1, steps)):
        t = time.perf_counter()
        step(x, y).numpy()
        times.append(time.perf_counter() - t)
    return statistics.median(times), time.perf_counter() - start, first


def plan_from_probe(config, batch, *, precision: str, steps_per_epoch: int, val_images: int,
                    strategy) -> tuple[dict[str, Any], float]:
    """The job's ``--budget_plan=probe``: (the plan as a dict, agreed by every worker: the
    :class:`pneumo_models.budget.BudgetPlan` fields plus ``probe_step_seconds`` {size: s}
    and ``probe_seconds``; the seconds the probe took, counted in the budget).

    ``config``: the job's TrainConfig; ``batch``: one (images, labels) batch of its
    training stream at the configured size; ``precision``: the resolved dtype policy."""
    p, n = config.pipeline, config.network
    start = time.perf_counter()
    images, labels = np.asarray(batch[0]), np.asarray(batch[1])

    def probe_at(size: int) -> tuple[float, float]:
        model = models.build_model(
            n.model, image_size=size, weights="none",
            augment=p.augmentation if p.augment == "device" else False, precision=precision,
            dropout=n.resolved_dropout, seed=config.seed,
            preprocessing=n.resolved_preprocessing, crop=n.crop, stem=n.resolved_stem)
        seconds, _, first = probe_step_seconds(
            model, to_model_input(images, size).numpy(), labels,
            optim.make_optimizer(config.optimizer, config.optimizer.learning_rate),
            optim.make_loss(config.optimizer))
        return seconds, first

    measured = {}
    measured[p.image_size], first = probe_at(p.image_size)

    def plan_now() -> budget.BudgetPlan:
        # the real run compiles its step once more (about the probe's first call)
        return budget.plan_budget(
            config.time_budget_minutes, epochs=config.epochs, image_size=p.image_size,
            step_seconds=dict(measured), steps_per_epoch=steps_per_epoch,
            val_images=val_images, batch_size=p.batch_size,
            overhead_seconds=time.perf_counter() - start + first, margin=MARGIN)

    plan = plan_now()
    if plan.image_size != p.image_size:  # the pixel rule is optimistic: measure that size
        measured[plan.image_size], _ = probe_at(plan.image_size)
        plan = plan_now()
    seconds = time.perf_counter() - start
    planned = cluster.broadcast_json(strategy, {
        **plan.as_dict(), "probe_step_seconds": {str(k): v for k, v in measured.items()},
        "probe_seconds": seconds})
    log.info("time budget %.1f min, planned from a probe (%.2f s per step at %d px, %.0f s): "
             "%s; the schedule is planned for %d epochs at %d px", config.time_budget_minutes,
             measured[p.image_size], p.image_size, seconds, planned["reason"],
             planned["epochs"], planned["image_size"])
    return planned, seconds
