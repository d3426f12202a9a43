"""The training job's optimizer, learning-rate schedule and loss, from an
:class:`pneumo_models.config.OptimizerConfig`.

* ``adamw``: Keras AdamW with decoupled weight decay on kernels only: biases and batch-norm
  scales and offsets (``bias``, ``gamma``, ``beta``) are excluded. ``adam``: plain Adam.
* :class:`WarmupCosine`: linear warmup from ``floor x peak`` to ``peak`` over the warmup
  steps, then either a cosine down to ``floor x peak`` at the last training step or the peak
  held (``constant``). Its length is a variable, so the training job's time budget can
  shorten it after the first epochs and the cosine still ends at its floor on the last step
  (the warmup takes at most half of the steps); the job saves the plan with its resume state
  and rebuilds the same schedule when it resumes.
* The loss: binary cross-entropy with ``label_smoothing`` (targets 0 and 1 become
  ``s/2`` and ``1 - s/2``).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from pneumo_models.config import OptimizerConfig

NO_DECAY = ("bias", "gamma", "beta")


@keras.saving.register_keras_serializable(package="pneumo")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate at optimizer step ``s`` (0-based).

    Args:
      peak: the learning rate after the warmup.
      warmup_steps: steps of linear warmup from ``floor * peak`` to ``peak`` (0: none); at
        most half of ``total_steps`` is used (a run shortened by a time budget still
        anneals).
      total_steps: training steps in all; with ``shape="cosine"`` the rate reaches
        ``floor * peak`` at step ``total_steps - 1`` (the last update) and stays there.
        Change it with :meth:`set_total_steps` (e.g. once a time budget is known).
      floor: fraction of ``peak`` where the warmup starts and the cosine ends.
      shape: ``cosine`` or ``constant`` (the peak after the warmup).
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, floor: float = 0.01,
                 shape: str = "cosine", name: str = "warmup_cosine"):
        if shape not in ("cosine", "constant"):
            raise ValueError(f"shape must be cosine or constant, got {shape!r}")
        if peak <= 0 or not 0 < floor <= 1 or warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"bad schedule: peak {peak}, floor {floor}, warmup {warmup_steps}, "
                             f"total {total_steps}")
        self.peak, self.floor, self.shape, self.name = float(peak), float(floor), shape, name
        self.warmup_steps = int(warmup_steps)
        self._total = tf.Variable(int(total_steps), dtype=tf.int64, trainable=False,
                                  name=f"{name}_total_steps")

    @property
    def total_steps(self) -> int:
        return int(self._total.numpy())

    def set_total_steps(self, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self._total.assign(int(total_steps))

    def effective_warmup(self, total_steps: int | None = None) -> int:
        """The warmup used for ``total_steps`` (default: the current length)."""
        total = self.total_steps if total_steps is None else total_steps
        return min(self.warmup_steps, total // 2)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        low = self.peak * self.floor
        total = tf.cast(self._total, tf.float32)
        warmup = tf.minimum(float(self.warmup_steps), tf.floor(total / 2.0))
        if self.warmup_steps:
            rising = low + (self.peak - low) * step / tf.maximum(warmup, 1.0)
        else:
            rising = tf.constant(self.peak)
        if self.shape == "constant":
            after = tf.constant(self.peak)
        else:
            span = tf.maximum(total - 1.0 - warmup, 1.0)
            progress = tf.clip_by_value((step - warmup) / span, 0.0, 1.0)
            after = low + (self.peak - low) * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return tf.where(step < warmup, rising, after)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "floor": self.floor, "shape": self.shape,
                "name": self.name}


def schedule_for(config: OptimizerConfig, steps_per_epoch: int, epochs: int,
                 learning_rate: float | None = None) -> WarmupCosine:
    """The config's schedule for ``epochs`` epochs of ``steps_per_epoch`` steps."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    total = max(1, epochs * steps_per_epoch)
    return WarmupCosine(learning_rate or config.learning_rate, warmup, total,
                        config.lr_floor, config.schedule)


def make_optimizer(config: OptimizerConfig, learning_rate) -> keras.optimizers.Optimizer:
    """Adam or AdamW (kernels only decayed) with ``learning_rate`` (a float or a schedule).
    With ``ema_momentum`` the optimizer keeps an exponential moving average of the trainable
    weights (Keras's ``use_ema``, updated in every ``apply``; its variables are saved with the
    optimizer's, so a resumed run keeps it) and ``finalize_variable_values`` writes the average
    into the model: :class:`pneumo_models.loop.TrainingLoop` calls it at the end of ``fit``, on
    the stream and on the device-resident set alike. Create it inside the strategy's scope."""
    ema = {"use_ema": True, "ema_momentum": config.ema_momentum} if config.ema_momentum else {}
    if config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay,
                                           **ema)
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
        return optimizer
    return keras.optimizers.Adam(learning_rate, **ema)


def make_loss(config: OptimizerConfig) -> keras.losses.Loss:
    return keras.losses.BinaryCrossentropy(label_smoothing=config.label_smoothing)
