"""The training job's own callbacks (Keras callbacks; every file they write goes through the
job's :class:`pneumo_data.common.outputs.OutputDir`, atomically)."""

from __future__ import annotations

import logging
import math
import os
import time

import keras

from pneumo_models.rundir import RESUME, weights_name

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


class TimeBudget(keras.callbacks.Callback):
    """Fits the run into ``minutes`` of training: at the end of the first two epochs it plans
    how many epochs fit (at most ``epochs``; the time already spent plus the last epoch's
    duration for each remaining one), shortens the learning-rate schedule to end on the
    last planned step, and stops training after that epoch. The plan is fixed from the
    second epoch on; ``plan`` is saved with the resume state so a resumed run keeps it, and
    ``seconds`` counts the training time of earlier processes of a resumed run.

    ``agree(plan)`` returns the plan every worker of a cluster uses (the chief's), so all
    of them stop at the same epoch. With ``--budget_plan=probe``, ``plan`` starts as the
    probe's epochs, ``seconds`` as the probe's time, and ``image_size`` and ``probe`` (the
    size and plan chosen before training) are saved with the resume state and recorded.
    """

    def __init__(self, minutes: float, epochs: int, steps_per_epoch: int, schedule=None,
                 plan: int | None = None, seconds: float = 0.0, agree=None,
                 image_size: int | None = None, probe: dict | None = None):
        super().__init__()
        self.image_size, self.probe = image_size, probe
        self.budget = minutes * 60.0
        self.epochs, self.steps_per_epoch, self.schedule = epochs, steps_per_epoch, schedule
        self.plan, self.seconds, self.agree = plan, float(seconds), agree or (lambda p: p)
        self.epoch_seconds: list[float] = []
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        took = time.perf_counter() - self._start
        self.seconds += took
        self.epoch_seconds.append(took)
        if self.budget > 0 and epoch < 2:  # plan after epochs 1 and 2 (0-based 0 and 1)
            remaining = max(self.budget - self.seconds, 0.0)
            planned = min(self.epochs, epoch + 1 + int(remaining // max(took, 1e-6)))
            planned = int(self.agree(max(planned, epoch + 1)))
            if planned != self.plan:
                if planned < self.epochs:
                    log.info("time budget %.1f min: epoch %d took %.0f s, %d of %d epochs fit; "
                             "the schedule ends after epoch %d", self.budget / 60, epoch + 1,
                             took, planned, self.epochs, planned)
                self.plan = planned
                if self.schedule is not None:
                    self.schedule.set_total_steps(planned * self.steps_per_epoch)
        if self.plan is not None and epoch + 1 >= self.plan:
            self.model.stop_training = True

    def record(self) -> dict:
        return {"minutes": self.budget / 60.0, "epochs_planned": self.plan,
                "image_size": self.image_size, "probe": self.probe,
                "training_seconds": round(self.seconds, 1),
                "epoch_seconds": [round(s, 1) for s in self.epoch_seconds]}


class KeepTrainedWeights(keras.callbacks.Callback):
    """With weight averaging (``--ema_momentum``) the model ends training holding the average
    (the loop's ``finalize`` runs before ``on_train_end``); this also saves the last trained
    weights, before averaging, as ``name`` (the whole model, atomically, through the job's
    OutputDir), so the two can be evaluated side by side. It copies the weights when training
    begins (a run resumed after its last epoch trains none) and at every epoch end (about
    1.6 MB for bn_cnn), and writes the file at the end of training."""

    def __init__(self, out, name: str):
        super().__init__()
        self.out, self.name = out, name
        self.trained = None

    def _copy(self) -> list:
        return [keras.ops.convert_to_numpy(v) for v in self.model.weights]

    def on_train_begin(self, logs=None):
        self.trained = self._copy()

    def on_epoch_end(self, epoch, logs=None):
        self.trained = self._copy()

    def on_train_end(self, logs=None):
        if self.trained is None:
            return
        averaged = self._copy()
        try:
            for variable, value in zip(self.model.weights, self.trained):
                variable.assign(value)
            with self.out.replacing(self.name) as tmp:
                self.model.save(tmp)
        finally:
            for variable, value in zip(self.model.weights, averaged):
                variable.assign(value)


class Resume(keras.callbacks.Callback):
    """Saves the training state after every finished epoch into ``resume/`` of the run's folder (a
    :class:`pneumo_models.rundir.RunDir`): ``model-pP-eE.weights.h5`` (the weights, the
    optimizer's variables, whatever the optimizer, loss-scaling wrapper included, and the
    augmentation RNG state), then ``state.json`` naming it (the epoch reached, the phase,
    the time budget's plan and time spent, and what ``more()`` returns: the device-resident
    set's walk), then the previous epoch's file is deleted: a
    kill at any point leaves a state.json whose weights file is complete and of the epoch it
    names. The job rebuilds the model and optimizer from its config and loads the file into
    them, so what is not a variable (the optimizer's weight-decay exclusions, the schedule)
    comes from the code, not from a saved config."""

    def __init__(self, out, run_dir, phase: int, guard: NaNGuard,
                 budget: TimeBudget | None = None, extra: dict | None = None, more=None):
        super().__init__()
        self.out, self.run_dir, self.phase, self.guard = out, run_dir, phase, guard
        self.extra = dict(extra or {})
        self.more = more  # () -> dict saved too, taken at each epoch's end (the input's state)
        self.folder = RESUME
        self.budget = budget

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.where is not None:
            return
        self.out.subdir(self.folder)
        name = weights_name(self.phase, epoch)
        with self.out.replacing(f"{self.folder}/{name}") as tmp:
            # Keras wants the name to end in .weights.h5; the partial name keeps "partial".
            named = tmp.with_name(tmp.name + ".weights.h5")
            try:
                self.model.save_weights(named)
                os.replace(named, tmp)
            finally:
                named.unlink(missing_ok=True)
        state = {"epoch": epoch, "phase": self.phase, "weights": name, **self.extra,
                 **(self.more() if self.more else {})}
        if self.budget is not None:
            state.update(plan=self.budget.plan, seconds=self.budget.seconds)
            if self.budget.probe:  # the size and plan chosen before training
                state.update(image_size=self.budget.image_size, probe=self.budget.probe)
        self.run_dir.write_resume_state(self.out, state)
        for old in sorted((self.out.path / self.folder).glob("model-*.weights.h5")):
            if old.name != name and self.out.owns(f"{self.folder}/{old.name}"):
                self.out.remove(f"{self.folder}/{old.name}")

