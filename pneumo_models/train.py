r"""The training job: prepared shards (or an image folder) to a trained, exported model.

    # the embedded default data, manual CNN, defaults everywhere:
    python -m pneumo_models.train --model_dir=runs/cnn
    # real data, prepared on the way (a no-op when already prepared):
    python -m pneumo_models.train --source_dir=chest_xray --model=vgg16 --fine_tune_epochs=3 \
        --model_dir=runs/vgg16
    # already prepared shards; any flag can also come from --flagfile=run.flags:
    python -m pneumo_models.train --data_dir=data/xray --model_dir=runs/cnn --precision=float32
    # the same run, bit for bit, on the same machine:
    python -m pneumo_models.train --data_dir=data/xray --model_dir=runs/cnn2 --seed=1 \
        --deterministic

Writes to ``model_dir``: ``config.json`` and ``config.flags`` (the run's options, written
once the data has been checked; a model_dir holding another run's config is refused unless
``--overwrite``), ``history.csv``, ``logs/`` (TensorBoard), ``best.keras`` (best val AUC),
``model.keras`` (the final model, the best weights), ``export/saved_model/`` (the serving
SavedModel of :mod:`pneumo_models.export`, threshold 0.5 until ``python -m
pneumo_models.export --threshold_from=...`` re-exports it; ``export/`` is that job's folder),
``data/`` (with ``--source_dir`` or the embedded data) and ``run.json``
(resolved precision and XLA, data identity, final val metrics; written last, it marks the run
complete). The folder is locked while the job runs, and a ledger lists what the job wrote:
the job never deletes or rewrites anything else, and ``--overwrite`` replaces only its own
files. A killed run continues from its last finished epoch when started again with the same
options; a complete run is not trained again.

Reproducibility: ``--seed`` fixes the initial weights, the class sampling and shuffling seeds
and the augmentation draws. Without ``--deterministic`` parallel stages of the input pipeline
hand over elements in the order they finish, so two runs see different batches and end with
different weights. ``--deterministic`` makes the element order fixed and TensorFlow's ops
deterministic (``tf.config.experimental.enable_op_determinism``, process-wide): two runs with
the same seed on the same machine and software end with identical weights (slower: the
pipeline's parallel stages keep their order). Across machines, TensorFlow versions or
oneDNN/CUDA kernels, results still differ in the last bits; and a resumed run continues the
same sequences but is not promised to be bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from pneumo_data.common.config import (
    config_from_dict,
    config_to_dict,
    config_to_flagfile,
    group,
    option,
)
from pneumo_data.common.errors import UserError
from pneumo_data.common.files import file_sha256, read_json
from pneumo_data.common.outputs import OutputDir
from pneumo_data.config import PipelineConfig
from pneumo_models.config import MODELS, NetworkConfig, OptimizerConfig
from pneumo_models.precision import JIT_CHOICES, PRECISIONS

log = logging.getLogger("pneumo.train")

BALANCE_MODES = ("resample", "class_weight", "none")
FINE_TUNE_PREFIX = {"vgg16": "block5", "resnet50": "conv5"}


class TrainError(UserError):
    """The job cannot start or could not finish; the message says why."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of the training job; each leaf field is also a command-line flag."""

    data_dir: str | None = option(None, "Prepared shards (a folder with manifest.json).")
    source_dir: str | None = option(
        None, "Image folder to prepare first (into MODEL_DIR/data). With neither this nor "
              "--data_dir: the embedded default dataset.")
    model_dir: str | None = option(None, "Output folder (default: runs/MODEL).")
    epochs: int = option(10, "Training epochs (first phase).")
    fine_tune_epochs: int = option(0, "Second phase: epochs with the backbone's last block "
                                      "trainable (vgg16: block5, resnet50: conv5).")
    precision: str = option("auto", "Dtype policy; auto picks per device.", choices=PRECISIONS)
    jit_compile: str = option("auto", "XLA for the train step; auto: on for GPUs, off for CPUs.",
                              choices=JIT_CHOICES)
    balance: str = option("resample", "resample: balanced stream (or --class_weights); "
                                      "class_weight: natural mix with loss weights; none: "
                                      "natural mix.", choices=BALANCE_MODES)
    seed: int = option(0, "Seed of weights, shuffling, sampling and augmentation.")
    deterministic: bool = option(
        False, "Reproduce the run exactly with the same --seed on the same machine: fixed "
               "element order and deterministic ops (slower).")
    early_stopping_patience: int = option(3, "Epochs without val AUC gain before stopping "
                                             "(0: never stop early).")
    steps_per_epoch: int = option(0, "Batches per epoch (0: the train split once).")
    overwrite: bool = option(
        False, "Start over in a model_dir that holds another run of this job (only the files "
               "the job wrote are deleted).")
    pipeline: PipelineConfig = group(PipelineConfig, "The training stream.")
    network: NetworkConfig = group(NetworkConfig, "The network.")
    optimizer: OptimizerConfig = group(OptimizerConfig, "The optimizer.")

    def resolved_model_dir(self) -> Path:
        return Path(self.model_dir or Path("runs") / self.network.model)

    def identity(self) -> dict[str, Any]:
        """The options that define the run (a re-run with equal ones resumes or is a no-op)."""
        values = config_to_dict(self)
        values.pop("overwrite")
        return values

    def validate(self) -> None:
        p, n, o = self.pipeline, self.network, self.optimizer
        for name, value in (("epochs", self.epochs), ("batch_size", p.batch_size),
                            ("image_size", p.image_size)):
            if value <= 0:
                raise TrainError(f"--{name} must be positive, got {value}")
        if p.image_size < 32:
            raise TrainError(f"--image_size must be at least 32, got {p.image_size}")
        for name in ("learning_rate", "fine_tune_learning_rate"):
            value = getattr(o, name)
            if not (value > 0 and math.isfinite(value)):
                raise TrainError(f"--{name} must be a positive number, got {value}")
        for name in ("early_stopping_patience", "fine_tune_epochs", "steps_per_epoch"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if n.dropout is not None and not 0 <= n.dropout < 1:
            raise TrainError(f"--dropout must be in [0, 1), got {n.dropout}")
        if n.model not in MODELS:
            raise TrainError(f"--model must be one of {MODELS}, got {n.model!r}")
        if self.fine_tune_epochs and n.model not in FINE_TUNE_PREFIX:
            raise TrainError(f"--fine_tune_epochs needs a backbone model, not {n.model}")
        if self.data_dir and self.source_dir:
            raise TrainError("give --data_dir or --source_dir, not both")
        if n.model == "manual_cnn" and n.weights == "imagenet":
            raise TrainError("manual_cnn has no ImageNet weights; use --weights=none or a file")
        if n.weights not in ("auto", "imagenet", "none") and not Path(n.weights).is_file():
            raise TrainError(f"--weights: file {n.weights} does not exist")
        if p.class_weights and self.balance != "resample":
            raise TrainError("--class_weights sets the mix of the resampled stream; it needs "
                             "--balance=resample")
        if p.cache not in ("memory", "none") and Path(p.cache).is_dir():
            raise TrainError(f"--cache {p.cache} is a folder; give a file path prefix")


# ---------------------------------------------------------------- checks before writing

def _check_data(m, config: TrainConfig) -> dict[str, int]:
    """Raises TrainError unless ``m`` can train and validate; returns train counts."""
    for split in ("train", "val"):
        if split not in m.splits:
            raise TrainError(f"{m.data_dir} has no {split!r} split; re-run prepare with a "
                             f"non-zero --val_fraction")
    counts = {c: m.count("train", c) for c in m.classes}
    missing = [c for c, n in counts.items() if n == 0]
    if missing:
        raise TrainError(f"the train split of {m.data_dir} has no {', '.join(missing)} images")
    val = {c: m.count("val", c) for c in m.classes}
    if sum(val.values()) == 0:
        raise TrainError(f"the val split of {m.data_dir} is empty (too few patients for "
                         f"--val_fraction); prepare more images or a larger --val_fraction")
    if min(val.values()) == 0:
        log.warning("the val split of %s has no %s images: val AUC is undefined and early "
                    "stopping and checkpoints cannot use it", m.data_dir,
                    [c for c, n in val.items() if n == 0])
    m.verify(("train", "val"), checksums=config.pipeline.verify_checksums)
    return counts


def _check_previous_run(out: OutputDir, config: TrainConfig) -> bool:
    """True when ``out`` holds this run complete; clears another run's files with
    --overwrite, refuses them without."""
    path = out.path / "config.json"
    if not path.exists():
        return False
    existing = read_json(path, "run config")
    current = config.identity()
    if existing != current:
        if not config.overwrite:
            diff = ", ".join(_diff(existing, current))
            raise TrainError(f"{out.path} holds another run ({diff}); choose another "
                             f"--model_dir, or pass --overwrite to replace that run (only the "
                             f"files the training job wrote are deleted)")
        removed = out.clear()
        log.info("--overwrite: removed the previous run's %s", ", ".join(removed))
        return False
    return (out.path / "run.json").exists()


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _prepared(config: TrainConfig, out: OutputDir):
    """The manifest of the run's data: --data_dir, or a prepare into MODEL_DIR/data."""
    from pneumo_data import manifest
    if config.data_dir:
        return manifest.load_manifest(config.data_dir)
    from pneumo_data.prepare import PrepareConfig, prepare
    data = out.nested("data", job="prepare")
    return prepare(PrepareConfig(source_dir=config.source_dir, output_dir=str(data),
                                 seed=config.seed, progress=sys.stderr.isatty()))


# ---------------------------------------------------------------- the job

def _compile(model, learning_rate: float, jit: bool):
    import keras
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc"),
                 keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall")],
        jit_compile=jit)


def _best_so_far(history: Path, key: str = "val_auc") -> float | None:
    if not history.exists():
        return None
    with open(history) as handle:
        values = [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else None


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs the job; returns the contents of run.json."""
    config.validate()
    if config.source_dir:  # a wrong folder fails before anything is created
        from pneumo_data.sources import presets
        presets.detect(Path(config.source_dir))
    given = None
    if config.data_dir:
        from pneumo_data import manifest
        given = manifest.load_manifest(config.data_dir)
        _check_data(given, config)
    with OutputDir(config.resolved_model_dir(), job="train") as out:
        if _check_previous_run(out, config):
            log.info("%s already holds this complete run; nothing to do", out.path)
            return read_json(out.path / "run.json", "run record")
        m = given or _prepared(config, out)
        counts = _check_data(m, config) if given is None else \
            {c: m.count("train", c) for c in m.classes}
        out.write_json("config.json", config.identity())
        out.write_text("config.flags", config_to_flagfile(
            dataclasses.replace(config, overwrite=False)))
        return _train(config, out, m, counts)


def _train(config: TrainConfig, out: OutputDir, m, counts: dict[str, int]) -> dict[str, Any]:
    from pneumo_data.common.jobs import import_tensorflow
    tf = import_tensorflow()
    import keras

    import pneumo_data
    from pneumo_models import callbacks as cb
    from pneumo_models import models
    from pneumo_models.export import export_into_model_dir
    from pneumo_models.precision import resolve_jit, resolve_precision

    p = config.pipeline
    precision = resolve_precision(config.precision)
    jit = resolve_jit(config.jit_compile)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    data_dir = m.data_dir
    log.info("model %s, precision %s, XLA %s, augment %s, balance %s, deterministic %s, data %s",
             config.network.model, precision, jit, p.augment, config.balance,
             config.deterministic, data_dir)
    # Keras warns at the end of every pass over the (finite) validation set; it is expected.
    warnings.filterwarnings("ignore", message="Your input ran out of data")

    natural = {c: n / sum(counts.values()) for c, n in counts.items()}
    stream_weights = None if config.balance == "resample" else natural
    loss_weights = None
    if config.balance == "class_weight":
        loss_weights = {i: 1.0 / (len(counts) * natural[c]) for i, c in enumerate(m.classes)}
    train_ds = pneumo_data.train_dataset_from_config(
        data_dir, dataclasses.replace(p, verify_checksums=False), seed=config.seed,
        deterministic=config.deterministic, class_weights=stream_weights)
    val_ds = pneumo_data.eval_dataset(data_dir, "val", batch_size=p.batch_size,
                                      image_size=p.image_size, verify_checksums=False)
    steps = config.steps_per_epoch or pneumo_data.steps_per_epoch(data_dir, p.batch_size)

    state_path = out.path / "resume" / "state.json"
    if state_path.exists():
        state = read_json(state_path, "resume state")
        model = models.load_model(out.path / "resume" / "model.keras")
        initial_epoch, phase = state["epoch"] + 1, state["phase"]
        log.info("resuming from %s: epoch %d, phase %d", out.path / "resume", initial_epoch + 1,
                 phase)
    else:
        model = models.build_model(
            config.network.model, image_size=p.image_size, weights=config.network.weights,
            augment=p.augmentation if p.augment == "device" else False,
            augment_backend="gather" if jit else "kernel", precision=precision,
            dropout=config.network.dropout, seed=config.seed)
        _compile(model, config.optimizer.learning_rate, jit)
        initial_epoch, phase = 0, 1

    history_path = out.claim("history.csv")
    _truncate_history(out, initial_epoch)
    logs_dir = out.subdir("logs")

    def run_phase(phase_no: int, first: int, last: int):
        guard = cb.NaNGuard()
        callbacks = [
            cb.Throughput(p.batch_size), guard,
            keras.callbacks.CSVLogger(str(history_path), append=True),
            keras.callbacks.TensorBoard(str(logs_dir)),
            cb.BestCheckpoint(out, "best.keras", initial_best=_best_so_far(history_path)),
            cb.Resume(out, phase_no, guard),
        ]
        if config.early_stopping_patience:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_auc", mode="max", patience=config.early_stopping_patience))
        history = model.fit(train_ds, steps_per_epoch=steps, epochs=last, initial_epoch=first,
                            validation_data=val_ds, class_weight=loss_weights, shuffle=False,
                            callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2)
        if guard.where is not None:
            epoch, batch, loss = guard.where
            raise TrainError(
                f"the loss became {loss} at epoch {epoch}, batch {batch}; training stopped. "
                f"Try a lower --learning_rate, or --precision=float32. The last good epoch is "
                f"kept in {out.path / 'resume'} (pass --overwrite to start over).")
        return (first + len(history.epoch)) if history.epoch else first

    if phase == 1:
        done = run_phase(1, initial_epoch, config.epochs)
        if config.fine_tune_epochs:
            if (out.path / "best.keras").exists():
                model = models.load_model(out.path / "best.keras")
            opened = models.unfreeze_for_fine_tuning(model, FINE_TUNE_PREFIX[config.network.model])
            log.info("fine-tuning: %d backbone layers trainable, learning rate %g", opened,
                     config.optimizer.fine_tune_learning_rate)
            _compile(model, config.optimizer.fine_tune_learning_rate, jit)
            phase, initial_epoch = 2, done
            out.write_json("resume/phase2.json", {"start": done})
    if phase == 2:
        start = read_json(out.path / "resume" / "phase2.json", "resume state")["start"]
        run_phase(2, initial_epoch, start + config.fine_tune_epochs)

    best_path = out.path / "best.keras"
    final = models.load_model(best_path) if best_path.exists() else model
    with out.replacing("model.keras") as tmp:
        final.save(tmp)
    export_into_model_dir(out, final, m.preprocess,
                          model_sha256=file_sha256(out.path / "model.keras"))
    out.seal("logs")
    metrics = final.evaluate(val_ds, verbose=0, return_dict=True)
    run = {
        "model": config.network.model, "precision": precision, "jit_compile": jit,
        "deterministic": config.deterministic, "seed": config.seed,
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "data_dir": os.path.relpath(Path(data_dir).resolve(), out.path.resolve()),
        "data_manifest_created": m.data["created"], "train_counts": counts,
        "val_metrics": {k: float(v) for k, v in metrics.items()},
        "history": _read_history(history_path),
    }
    out.write_json("run.json", run)
    out.remove("resume")
    log.info("done: val AUC %.4f, model in %s", run["val_metrics"].get("auc", float("nan")),
             out.path)
    return run


def run_data_dir(model_dir: str | os.PathLike, run: dict[str, Any]) -> Path | None:
    """The data_dir a run was trained on (run.json records it relative to the model_dir)."""
    recorded = run.get("data_dir")
    if not recorded:
        return None
    return (Path(model_dir) / recorded).resolve() if not Path(recorded).is_absolute() \
        else Path(recorded)


def load_run_config(model_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig a model_dir was trained with (from its config.json)."""
    data = read_json(Path(model_dir) / "config.json", "run config")
    try:
        return config_from_dict(TrainConfig, data)
    except (TypeError, ValueError) as error:
        raise TrainError(f"{model_dir}/config.json does not match this version's options "
                         f"({error})") from None


def _truncate_history(out: OutputDir, first_epoch: int) -> None:
    """Drops history rows of epochs that will run again (a kill between writes)."""
    path = out.path / "history.csv"
    if not path.exists():
        return
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    kept = [r for r in rows if int(r["epoch"]) < first_epoch]
    if len(kept) == len(rows):
        return
    with out.replacing("history.csv") as tmp, open(tmp, "w", newline="") as handle:
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
    from pneumo_data.common.jobs import run_job

    run_job("train", TrainConfig, train)
