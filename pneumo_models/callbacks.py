"""The training job's own callbacks (Keras callbacks; every file they write goes through the
job's :class:`pneumo_data.common.outputs.OutputDir`, atomically)."""

from __future__ import annotations

import logging
import math
import time

import keras

log = logging.getLogger("pneumo.train")


class Throughput(keras.callbacks.Callback):
    """Adds ``images_per_second`` (training part of the epoch) and ``epoch_seconds`` to the
    epoch logs."""

    def __init__(self, images_per_step: int):
        super().__init__()
        self.images_per_step = images_per_step
        self.start = self.end = None
        self.steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.end, self.steps = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_test_begin(self, logs=None):
        if self.end is None:
            self.end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        seconds = (self.end or now) - self.start
        rate = self.steps * self.images_per_step / max(seconds, 1e-9)
        if logs is not None:
            logs["images_per_second"] = rate
            logs["epoch_seconds"] = now - self.start
        log.info("epoch %d: %.0f images/s (training), %.1fs with validation", epoch + 1, rate,
                 now - self.start)


class NaNGuard(keras.callbacks.Callback):
    """Stops at the first non-finite loss and remembers where (epoch, batch, loss)."""

    def __init__(self):
        super().__init__()
        self.where = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.where = (self.epoch + 1, batch + 1, float(loss))
            self.model.stop_training = True


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the whole model to ``name`` (atomically) when ``monitor`` improves.

    ``initial_best`` carries the best value of epochs before a resume, so a resumed run does
    not replace a better checkpoint with a worse one.
    """

    def __init__(self, out, name: str = "best.keras", monitor: str = "val_auc",
                 mode: str = "max", initial_best: float | None = None):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be max or min, got {mode!r}")
        self.out, self.name, self.monitor, self.mode = out, name, monitor, mode
        self.best = initial_best

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not self._better(float(value)):
            return
        self.best = float(value)
        with self.out.replacing(self.name) as tmp:
            self.model.save(tmp)
        log.info("epoch %d: %s improved to %.4f, saved %s", epoch + 1, self.monitor, self.best,
                 self.name)


class Resume(keras.callbacks.Callback):
    """Saves the whole model (optimizer and augmentation RNG state included) and the epoch
    reached after every finished epoch, into ``resume/`` of the job's output folder."""

    def __init__(self, out, phase: int, guard: NaNGuard, folder: str = "resume"):
        super().__init__()
        self.out, self.phase, self.guard, self.folder = out, phase, guard, folder

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.where is not None:
            return
        self.out.subdir(self.folder)
        with self.out.replacing(f"{self.folder}/model.keras") as tmp:
            self.model.save(tmp)
        self.out.write_json(f"{self.folder}/state.json", {"epoch": epoch, "phase": self.phase})
