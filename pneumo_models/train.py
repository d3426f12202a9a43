r"""The training job: prepared shards (or an image folder) to a trained, exported model.

    # the embedded default data, manual CNN, defaults everywhere:
    python -m pneumo_models.train --model_dir=runs/cnn
    # real data, prepared on the way (a no-op when already prepared):
    python -m pneumo_models.train --source_dir=chest_xray --model=vgg16 --fine_tune_epochs=3 \
        --model_dir=runs/vgg16
    # already prepared shards; any flag can also come from --flagfile=run.flags:
    python -m pneumo_models.train --data_dir=data/xray --model_dir=runs/cnn --precision=float32

Writes to ``model_dir``: ``config.json`` and ``config.flags`` (the run's
options; a model_dir holding another run's config is refused),
``history.csv``, ``logs/`` (TensorBoard), ``best.keras`` (best val AUC),
``model.keras`` (the final model, the best weights), ``export/`` (SavedModel
serving encoded JPEG/PNG bytes) and ``run.json`` (resolved precision and XLA,
data identity, final val metrics; written last, it marks the run complete).
A killed run continues from its last finished epoch when started again with
the same options; a complete run is not trained again.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from pneumo_data.atomic import replacing, write_text
from pneumo_data.flagconfig import config_to_dict, config_to_flagfile, option
from pneumo_data.pipeline import AUGMENT_MODES
from pneumo_models.models import MODELS
from pneumo_models.precision import JIT_CHOICES, PRECISIONS

log = logging.getLogger("pneumo.train")

BALANCE_MODES = ("resample", "class_weight", "none")
FINE_TUNE_PREFIX = {"vgg16": "block5", "resnet50": "conv5"}


class TrainError(ValueError):
    """The job cannot start or could not finish; the message says why."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of the training job; each field is also a command-line flag."""

    data_dir: str | None = option(None, "Prepared shards (a folder with manifest.json).")
    source_dir: str | None = option(
        None, "Image folder to prepare first (into MODEL_DIR/data). With neither this nor "
              "--data_dir: the embedded default dataset.")
    model_dir: str | None = option(None, "Output folder (default: runs/MODEL).")
    model: str = option("manual_cnn", "Network.", choices=MODELS)
    weights: str = option("auto", "imagenet, none, auto (imagenet for vgg16/resnet50, none "
                                  "for manual_cnn) or a weights file path.")
    epochs: int = option(10, "Training epochs (first phase).")
    batch_size: int = option(32, "Global batch size.")
    learning_rate: float = option(1e-3, "Adam learning rate.")
    image_size: int = option(150, "Model input side in pixels.")
    precision: str = option("auto", "Dtype policy; auto picks per device.", choices=PRECISIONS)
    jit_compile: str = option("auto", "XLA for the train step; auto: on for GPUs, off for CPUs.",
                              choices=JIT_CHOICES)
    augment: str = option("device", "Where the affine augmentation runs.", choices=AUGMENT_MODES)
    balance: str = option("resample", "resample: balanced stream; class_weight: natural mix "
                                      "with loss weights; none: natural mix.",
                          choices=BALANCE_MODES)
    seed: int = option(0, "Seed of weights, shuffling, sampling and augmentation.")
    early_stopping_patience: int = option(3, "Epochs without val AUC gain before stopping "
                                             "(0: never stop early).")
    fine_tune_epochs: int = option(0, "Second phase: epochs with the backbone's last block "
                                      "trainable (vgg16: block5, resnet50: conv5).")
    fine_tune_learning_rate: float = option(1e-5, "Learning rate of the second phase.")
    steps_per_epoch: int = option(0, "Batches per epoch (0: the train split once).")
    cache: str = option("memory", "Decoded-image cache: memory, none or a file prefix.")

    def resolved_model_dir(self) -> Path:
        return Path(self.model_dir or Path("runs") / self.model)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) <= 0:
                raise TrainError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.image_size < 32:
            raise TrainError(f"--image_size must be at least 32, got {self.image_size}")
        for name in ("learning_rate", "fine_tune_learning_rate"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise TrainError(f"--{name} must be a positive number, got {value}")
        for name in ("early_stopping_patience", "fine_tune_epochs", "steps_per_epoch"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.fine_tune_epochs and self.model not in FINE_TUNE_PREFIX:
            raise TrainError(f"--fine_tune_epochs needs a backbone model, not {self.model}")
        if self.data_dir and self.source_dir:
            raise TrainError("give --data_dir or --source_dir, not both")
        if self.model not in MODELS:
            raise TrainError(f"--model must be one of {MODELS}, got {self.model!r}")
        if self.model == "manual_cnn" and self.weights == "imagenet":
            raise TrainError("manual_cnn has no ImageNet weights; use --weights=none or a file")
        if self.weights not in ("auto", "imagenet", "none") and not Path(self.weights).is_file():
            raise TrainError(f"--weights: file {self.weights} does not exist")


# ---------------------------------------------------------------- callbacks

def _callbacks_module():
    import keras

    class Throughput(keras.callbacks.Callback):
        """Adds ``images_per_second`` (training part of the epoch) to the logs."""

        def __init__(self, images_per_step: int):
            super().__init__()
            self.images_per_step = images_per_step
            self.steps = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.end, self.steps = time.perf_counter(), None, 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1

        def on_test_begin(self, logs=None):
            if self.end is None:
                self.end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = (self.end or time.perf_counter()) - self.start
            rate = self.steps * self.images_per_step / max(seconds, 1e-9)
            if logs is not None:
                logs["images_per_second"] = rate
                logs["epoch_seconds"] = time.perf_counter() - self.start
            log.info("epoch %d: %.0f images/s (training), %.1fs with validation",
                     epoch + 1, rate, time.perf_counter() - self.start)

    class NaNGuard(keras.callbacks.Callback):
        """Stops at the first non-finite loss and remembers where."""

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

    class Resume(keras.callbacks.Callback):
        """Saves the whole model (optimizer included) after every finished epoch."""

        def __init__(self, directory: Path, phase: int, guard: NaNGuard):
            super().__init__()
            self.directory, self.phase, self.guard = directory, phase, guard

        def on_epoch_end(self, epoch, logs=None):
            if self.guard.where is not None:
                return
            with replacing(self.directory / "model.keras") as tmp:
                self.model.save(tmp)
            _write_json(self.directory / "state.json", {"epoch": epoch, "phase": self.phase})

    return Throughput, NaNGuard, Resume


def _write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def _best_so_far(history: Path, key: str = "val_auc") -> float | None:
    if not history.exists():
        return None
    with open(history) as handle:
        values = [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else None


# ---------------------------------------------------------------- the job

def _check_model_dir(config: TrainConfig, model_dir: Path) -> bool:
    """True when the run in model_dir is already complete with this config."""
    path = model_dir / "config.json"
    if not path.exists():
        return False
    existing = json.loads(path.read_text())
    current = config_to_dict(config)
    if existing != current:
        diff = ", ".join(f"{k}: {existing.get(k)!r} -> {current.get(k)!r}"
                         for k in sorted(set(existing) | set(current))
                         if existing.get(k) != current.get(k))
        raise TrainError(f"{model_dir} holds another run's config ({diff}); choose another "
                         f"--model_dir, or delete that folder to start over")
    return (model_dir / "run.json").exists()


def _prepared(config: TrainConfig, model_dir: Path, m):
    """The manifest of the run's data: ``m`` (from --data_dir) or a fresh prepare."""
    if m is None:
        from pneumo_data.prepare import PrepareConfig, prepare
        m = prepare(PrepareConfig(source_dir=config.source_dir,
                                  output_dir=str(model_dir / "data"), seed=config.seed))
    for split in ("train", "val"):
        if split not in m.splits:
            raise TrainError(f"{m.data_dir} has no {split!r} split; re-run prepare with a "
                             f"non-zero --val_fraction")
    return m


def _compile(model, learning_rate: float, jit: bool):
    import keras
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc"),
                 keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall")],
        jit_compile=jit)


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs the job; returns the contents of run.json."""
    config.validate()
    # Keras warns at the end of every pass over the (finite) validation set; it is expected.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    model_dir = config.resolved_model_dir()
    if _check_model_dir(config, model_dir):
        log.info("%s already holds this complete run; nothing to do", model_dir)
        return json.loads((model_dir / "run.json").read_text())
    given = None
    if config.data_dir:  # a bad data_dir fails before anything is written
        from pneumo_data import manifest
        given = manifest.load_manifest(config.data_dir)

    import keras
    import tensorflow as tf

    import pneumo_data
    from pneumo_models import models
    from pneumo_models.export import export_serving
    from pneumo_models.precision import resolve_jit, resolve_precision

    precision = resolve_precision(config.precision)
    jit = resolve_jit(config.jit_compile)
    model_dir.mkdir(parents=True, exist_ok=True)
    _write_json(model_dir / "config.json", config_to_dict(config))
    write_text(model_dir / "config.flags", config_to_flagfile(config))
    m = _prepared(config, model_dir, given)
    data_dir = m.data_dir
    keras.utils.set_random_seed(config.seed)
    log.info("model %s, precision %s, XLA %s, augment %s, balance %s, data %s",
             config.model, precision, jit, config.augment, config.balance, data_dir)

    counts = {c: m.count("train", c) for c in m.classes}
    natural = {c: n / sum(counts.values()) for c, n in counts.items()}
    stream_weights = None if config.balance == "resample" else natural
    loss_weights = None
    if config.balance == "class_weight":
        loss_weights = {i: 1.0 / (len(counts) * natural[c]) for i, c in enumerate(m.classes)}
    train_ds = pneumo_data.train_dataset(
        data_dir, batch_size=config.batch_size, image_size=config.image_size,
        class_weights=stream_weights, augment=config.augment, cache=config.cache,
        seed=config.seed)
    val_ds = pneumo_data.eval_dataset(data_dir, "val", batch_size=config.batch_size,
                                      image_size=config.image_size)
    steps = config.steps_per_epoch or pneumo_data.steps_per_epoch(data_dir, config.batch_size)

    resume_dir = model_dir / "resume"
    state_path = resume_dir / "state.json"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        model = keras.models.load_model(resume_dir / "model.keras")
        initial_epoch, phase = state["epoch"] + 1, state["phase"]
        log.info("resuming from %s: epoch %d, phase %d", resume_dir, initial_epoch + 1, phase)
    else:
        model = models.build_model(
            config.model, image_size=config.image_size, weights=config.weights,
            augment=config.augment == "device",
            augment_backend="gather" if jit else "kernel", precision=precision,
            seed=config.seed)
        _compile(model, config.learning_rate, jit)
        initial_epoch, phase = 0, 1

    Throughput, NaNGuard, Resume = _callbacks_module()
    history_path = model_dir / "history.csv"
    _truncate_history(history_path, initial_epoch)

    def run_phase(phase_no: int, first: int, last: int):
        guard = NaNGuard()
        callbacks = [
            Throughput(config.batch_size), guard,
            keras.callbacks.CSVLogger(str(history_path), append=True),
            keras.callbacks.TensorBoard(str(model_dir / "logs")),
            keras.callbacks.ModelCheckpoint(
                str(model_dir / "best.keras"), monitor="val_auc", mode="max",
                save_best_only=True, initial_value_threshold=_best_so_far(history_path)),
            Resume(resume_dir, phase_no, guard),
        ]
        if config.early_stopping_patience:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_auc", mode="max", patience=config.early_stopping_patience))
        history = model.fit(train_ds, steps_per_epoch=steps, epochs=last, initial_epoch=first,
                            validation_data=val_ds, class_weight=loss_weights,
                            callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2)
        if guard.where is not None:
            epoch, batch, loss = guard.where
            raise TrainError(
                f"the loss became {loss} at epoch {epoch}, batch {batch}; training stopped. "
                f"Try a lower --learning_rate, or --precision=float32. The last good epoch is "
                f"kept in {resume_dir} (delete {model_dir} to start over).")
        return (first + len(history.epoch)) if history.epoch else first

    if phase == 1:
        done = run_phase(1, initial_epoch, config.epochs)
        if config.fine_tune_epochs:
            if (model_dir / "best.keras").exists():
                model = keras.models.load_model(model_dir / "best.keras")
            opened = models.unfreeze_for_fine_tuning(model, FINE_TUNE_PREFIX[config.model])
            log.info("fine-tuning: %d backbone layers trainable, learning rate %g", opened,
                     config.fine_tune_learning_rate)
            _compile(model, config.fine_tune_learning_rate, jit)
            phase, initial_epoch = 2, done
            _write_json(resume_dir / "phase2.json", {"start": done})
    if phase == 2:
        start = json.loads((resume_dir / "phase2.json").read_text())["start"]
        run_phase(2, initial_epoch, start + config.fine_tune_epochs)

    best_path = model_dir / "best.keras"
    final = keras.models.load_model(best_path) if best_path.exists() else model
    with replacing(model_dir / "model.keras") as tmp:
        final.save(tmp)
    export_serving(final, model_dir / "export")
    metrics = final.evaluate(val_ds, verbose=0, return_dict=True)
    run = {
        "model": config.model, "precision": precision, "jit_compile": jit,
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "data_dir": str(Path(data_dir).resolve()),
        "data_manifest_created": m.data["created"], "train_counts": counts,
        "val_metrics": {k: float(v) for k, v in metrics.items()},
        "history": _read_history(history_path),
    }
    _write_json(model_dir / "run.json", run)
    shutil.rmtree(resume_dir, ignore_errors=True)
    log.info("done: val AUC %.4f, model in %s", run["val_metrics"].get("auc", float("nan")),
             model_dir)
    return run


def _truncate_history(path: Path, first_epoch: int) -> None:
    """Drops history rows of epochs that will run again (a kill between writes)."""
    if not path.exists():
        return
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    kept = [r for r in rows if int(r["epoch"]) < first_epoch]
    if len(kept) == len(rows):
        return
    with replacing(path) as tmp, open(tmp, "w", newline="") as handle:
        if kept:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path) as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]



if __name__ == "__main__":
    from pneumo_data.flagconfig import run_job
    from pneumo_data.manifest import ManifestError, ShardIntegrityError
    from pneumo_models.models import WeightsUnavailableError

    run_job("train", TrainConfig, train,
            (TrainError, ManifestError, ShardIntegrityError, WeightsUnavailableError))
