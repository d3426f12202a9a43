r"""The training job: prepared shards (or an image folder) to a trained, exported model.

    # the embedded default data, the default recipe (bn_cnn, see pneumo_models.recipes):
    python -m pneumo_models.train --model_dir=runs/cnn
    # the seed's recipe exactly (manual_cnn, x/255, Adam 1e-3, early stopping, best epoch):
    python -m pneumo_models.train --recipe=seed --model_dir=runs/seed
    # real data, prepared on the way (a no-op when already prepared):
    python -m pneumo_models.train --source_dir=chest_xray --model=vgg16 --fine_tune_epochs=3 \
        --model_dir=runs/vgg16
    # already prepared shards; any flag can also come from --flagfile=run.flags:
    python -m pneumo_models.train --data_dir=data/xray --model_dir=runs/cnn --precision=float32
    # the same run, bit for bit, on the same machine:
    python -m pneumo_models.train --data_dir=data/xray --model_dir=runs/cnn2 --seed=1 \
        --deterministic
    # every GPU of the machine (--batch_size is the global batch), or a cluster (one
    # process per machine, each with its TF_CONFIG), or input from a tf.data service:
    python -m pneumo_models.train --data_dir=data/xray --model_dir=runs/cnn --batch_size=256
    TF_CONFIG='{"cluster": {"worker": ["h1:2222", "h2:2222"]}, "task": {"type": "worker", \
        "index": 0}}' python -m pneumo_models.train --strategy=multi_worker --data_dir=...
    python -m pneumo_models.train --data_dir=data/xray --data_service=grpc://dispatcher:5050

Writes to ``model_dir``: ``config.json`` and ``config.flags`` (the run's options, written
once the data has been checked; a model_dir holding another run's config is refused unless
``--overwrite``), ``history.csv``, ``logs/`` (TensorBoard), ``best.keras`` (best val AUC),
``model.keras`` (the shipped model: the last epoch's weights, or with ``--ship=best`` the
best val AUC's), ``export/saved_model/`` (the serving SavedModel of
:mod:`pneumo_models.export`, threshold 0.5 until ``python -m pneumo_models.export
--threshold_from=...`` re-exports it; ``export/`` is that job's folder), ``data/`` (with
``--source_dir`` or the embedded data) and ``run.json`` (resolved precision and XLA, data
identity, final val metrics; written last, it marks the run complete; it records the recipe,
the time budget's plan and the epochs' durations). The default recipe has a 13-minute
training budget (``--time_budget_minutes``): after the first and second epochs the job plans
how many of ``--epochs`` fit and shortens the cosine so it still ends on the last of them.
The folder is locked while the job runs, and a ledger lists what the job wrote: the job
never deletes or rewrites anything else, and ``--overwrite`` replaces only its own files. A
killed run continues from its last finished epoch when started again with the same options;
a complete run is not trained again.

Reproducibility: ``--seed`` fixes the initial weights, the class sampling and shuffling seeds
and the augmentation draws. Without ``--deterministic`` parallel stages of the input pipeline
hand over elements in the order they finish, so two runs see different batches and end with
different weights. ``--deterministic`` makes the element order fixed and TensorFlow's ops
deterministic (``tf.config.experimental.enable_op_determinism``, process-wide): two runs with
the same seed on the same machine and software end with identical weights (slower: the
pipeline's parallel stages keep their order). Across machines, TensorFlow versions or
oneDNN/CUDA kernels, results still differ in the last bits; and a resumed run continues the
same sequences but is not promised to be bit-identical to an uninterrupted one.

Distribution (``--strategy``, see :mod:`pneumo_models.distribute`). One training loop,
:class:`pneumo_models.loop.TrainingLoop`, runs every strategy, one device included, rather
than ``model.fit`` where it works and a loop where it does not: ``fit`` fails under
MultiWorkerMirroredStrategy with TensorFlow 2.21 / Keras 3.15 (keras-team/keras#20585), so
a custom step is needed there anyway, and one code path keeps every feature of the job (class
weights, loss scaling, metrics, callbacks, checkpoints, resume, history) identical on 1, 8 or
64 devices and tested once. The loop takes the optimizer and loss objects :func:`_compile`
builds, so a learning-rate schedule or label smoothing is a change there, not in the loop.
Only the chief writes ``model_dir``. Every other worker runs the same code and callbacks
(saving can need every worker, and one that skipped a collective would leave the rest
waiting) into a scratch folder of its own outside ``model_dir``
(:func:`pneumo_models.distribute.scratch_dir`), deleted at the end; the chief's decisions
(run complete, another run's config, its resume state and best checkpoint) reach the
workers through collectives, so a worker needs nothing on disk to resume and no worker
returns or fails alone.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import sys
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
from pneumo_models.config import DistributeConfig, NetworkConfig, OptimizerConfig
from pneumo_models.precision import JIT_CHOICES, PRECISIONS
from pneumo_models.recipes import RECIPES

log = logging.getLogger("pneumo.train")

BALANCE_MODES = ("resample", "class_weight", "none")
SHIP_CHOICES = ("last", "best")
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
    recipe: str = option(
        "default", "default: bn_cnn, standardisation, affine + intensity augmentation, AdamW "
                   "with warmup and cosine decay, label smoothing, 12 epochs, the last epoch "
                   "shipped, a 13-minute budget; seed: the seed's manual_cnn recipe exactly. "
                   "Options given explicitly win (see pneumo_models.recipes).",
        choices=RECIPES)
    epochs: int = option(12, "Training epochs (first phase).")
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
    early_stopping_patience: int = option(0, "Epochs without val AUC gain before stopping "
                                             "(0: never stop early).")
    ship: str = option(
        "last", "Which weights become model.keras: last (the final epoch's, once the cosine "
                "has ended; val AUC saturates near 1 on a split from the training batch, so "
                "choosing on it picks noise) or best (the best val AUC, best.keras).",
        choices=SHIP_CHOICES)
    time_budget_minutes: float = option(
        13.0, "Training time budget: after the first and second epochs the job plans as "
              "many epochs as fit (at most --epochs) and the schedule ends on the last of "
              "them (0: none).")
    steps_per_epoch: int = option(0, "Batches per epoch (0: the train split once).")
    overwrite: bool = option(
        False, "Start over in a model_dir that holds another run of this job (only the files "
               "the job wrote are deleted).")
    pipeline: PipelineConfig = group(PipelineConfig, "The training stream.")
    network: NetworkConfig = group(NetworkConfig, "The network.")
    optimizer: OptimizerConfig = group(OptimizerConfig, "The optimizer.")
    distribution: DistributeConfig = group(DistributeConfig,
                                           "Devices, workers and the input service.")

    @classmethod
    def resolve_given(cls, config: "TrainConfig", given) -> "TrainConfig":
        """The recipe's values for every recipe option the user did not give."""
        from pneumo_models import recipes
        return recipes.resolve(config, given)

    def resolved_model_dir(self) -> Path:
        return Path(self.model_dir or Path("runs") / self.network.model)

    def identity(self) -> dict[str, Any]:
        """The options that define the run (a re-run with equal ones resumes or is a no-op)."""
        values = config_to_dict(self)
        values.pop("overwrite")
        return values

    def validate(self) -> None:
        p, n, o, d = self.pipeline, self.network, self.optimizer, self.distribution
        for name, value in (("epochs", self.epochs), ("batch_size", p.batch_size),
                            ("image_size", p.image_size)):
            if value <= 0:
                raise TrainError(f"--{name} must be positive, got {value}")
        if p.image_size < 32:
            raise TrainError(f"--image_size must be at least 32, got {p.image_size}")
        try:  # the learning rates, dropout, network and preprocessing
            o.validate()
            n.validate()
        except UserError as error:
            raise TrainError(str(error)) from None
        if not (self.time_budget_minutes >= 0 and math.isfinite(self.time_budget_minutes)):
            raise TrainError(f"--time_budget_minutes must be >= 0, got "
                             f"{self.time_budget_minutes}")
        for name in ("early_stopping_patience", "fine_tune_epochs", "steps_per_epoch"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name} must be >= 0, got {getattr(self, name)}")
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
        if d.steps_per_execution < 1:
            raise TrainError(f"--steps_per_execution must be >= 1, got {d.steps_per_execution}")
        if d.tpu and d.strategy != "tpu":
            raise TrainError("--tpu names the TPU of --strategy=tpu; add --strategy=tpu")
        if d.data_service:
            from pneumo_data.service import service_address
            service_address(d.data_service)  # a clear error for a malformed address
            if self.deterministic:
                raise TrainError(
                    "--deterministic cannot hold with --data_service: which service worker "
                    "reads which file, and the order batches arrive in, depend on timing. "
                    "Drop one of the two")


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

def _compile(model, config: TrainConfig, learning_rate, jit: bool):
    """Gives ``model`` the optimizer and loss of a training phase (created inside the
    strategy's scope by the caller): ``learning_rate`` is a float or a schedule. The
    training loop uses exactly these objects (``model.optimizer``, ``model.loss``), and
    saved models keep the optimizer's state. Metrics are the loop's own."""
    from pneumo_models import optim
    model.compile(optimizer=optim.make_optimizer(config.optimizer, learning_rate),
                  loss=optim.make_loss(config.optimizer), jit_compile=jit)



def _best_so_far(history: Path, key: str = "val_auc") -> float | None:
    if not history.exists():
        return None
    with open(history) as handle:
        values = [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else None


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs the job; returns the contents of run.json.

    Under ``--strategy=multi_worker`` every worker runs this with the same config; the
    chief writes ``model_dir`` and returns its run.json, the others train in a scratch
    folder they delete at the end and return the same record.
    """
    from pneumo_models import distribute

    config.validate()
    if config.source_dir:  # a wrong folder fails before anything is created
        from pneumo_data.sources import presets
        presets.detect(Path(config.source_dir))
    given = None
    if config.data_dir:
        from pneumo_data import manifest
        given = manifest.load_manifest(config.data_dir)
        _check_data(given, config)
    d = config.distribution
    chief, task = distribute.role(d.strategy)  # TF_CONFIG checked before TensorFlow starts
    strategy = distribute.make_strategy(d.strategy, tpu=d.tpu)
    distribute.per_replica_batch_size(config.pipeline.batch_size, strategy)
    model_dir = config.resolved_model_dir()
    folder = model_dir if chief else distribute.scratch_dir(model_dir, task)
    out = OutputDir(folder, job="train")
    opened = False
    try:
        complete, error = False, None
        try:
            out.open()
            opened = True
            if chief:
                complete = _check_previous_run(out, config)
            else:
                out.clear()  # a killed worker's earlier scratch: its state comes from the chief
        except UserError as caught:
            error = caught
        complete, run_id = _agree(strategy, task, complete, error)
        if complete:
            record = read_json(out.path / "run.json", "run record") if chief else None
            log.info("%s already holds this complete run; nothing to do", model_dir)
            return distribute.broadcast_json(strategy, record)
        if not chief:
            log.info("%s: training beside the chief; scratch folder %s (deleted at the end)",
                     task, folder)
        m = given or _prepared(config, out)
        counts = _check_data(m, config) if given is None else \
            {c: m.count("train", c) for c in m.classes}
        out.write_json("config.json", config.identity())
        out.write_text("config.flags", config_to_flagfile(
            dataclasses.replace(config, overwrite=False)))
        return _train(config, out, m, counts, strategy, run_id)
    except Exception as error:
        if not (distribute.is_multi_worker(strategy) and distribute.is_peer_failure(error)):
            raise
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise TrainError(
            f"{task}: another worker of the cluster stopped or cannot be reached "
            f"({type(error).__name__}: {first}). Start every worker again with the same "
            f"command: the run resumes from its last finished epoch") from None
    finally:
        if chief or not opened:
            out.close()
        else:
            _remove_scratch(out)


def _agree(strategy, task: str, complete: bool, error: Exception | None) -> tuple[bool, int]:
    """Every worker learns the chief's decision (run complete?) and a run id drawn by the
    chief, and stops when any worker failed before training (a worker that returned or
    raised alone would leave the others waiting in a collective forever). Raises this
    worker's own error, or a TrainError naming the failed workers."""
    import numpy as np

    from pneumo_models import distribute
    run_id = int.from_bytes(os.urandom(6), "big")
    mine = np.array([int(complete), int(error is not None), run_id], np.int64)
    every = distribute.gather_over_workers(strategy, mine)
    if error is not None:
        raise error
    failed = [name for name, row in zip(distribute.task_names(strategy), every) if row[1]]
    if failed:
        raise TrainError(f"{', '.join(failed)} stopped with an error before training (see "
                         f"its log); {task} stops too")
    return bool(every[0][0]), int(every[0][2])


def _remove_scratch(out: OutputDir) -> None:
    """Deletes a worker's scratch folder: what its ledger lists, then the folder when
    nothing else is left in it."""
    from pneumo_data.common.outputs import RESERVED
    try:
        out.clear()
    except UserError as error:
        log.warning("kept the scratch folder %s: %s", out.path, error)
        out.close()
        return
    out.close()
    if out.path.is_dir() and set(os.listdir(out.path)) <= RESERVED:
        for name in os.listdir(out.path):
            (out.path / name).unlink()
        out.path.rmdir()


# Files a worker needs from the chief to continue a run: the resume state (and the weights
# file it names), the best checkpoint (fine-tuning can start from it, the final model can be
# it) and the history (the best val AUC so far, the epochs done).
_RUN_STATE = ("resume/state.json", "resume/phase2.json", "best.keras", "history.csv")


def _is_run_state(name: str) -> bool:
    from pneumo_models.callbacks import WEIGHTS_PATTERN
    return name in _RUN_STATE or (name.startswith("resume/") and
                                  WEIGHTS_PATTERN.fullmatch(name[len("resume/"):]) is not None)


def _share_run_state(strategy, out: OutputDir) -> None:
    """Copies the chief's run state (``_RUN_STATE``) into every other worker's scratch
    folder (collectives: the workers need no state of their own to resume)."""
    import io
    import tarfile

    from pneumo_models import distribute
    if not distribute.is_multi_worker(strategy):
        return
    data = None
    if distribute.is_chief(strategy):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            names = list(_RUN_STATE)
            state = out.path / "resume" / "state.json"
            if state.is_file():
                names.append(f"resume/{read_json(state, 'resume state').get('weights')}")
            for name in names:
                if _is_run_state(name) and (out.path / name).is_file():
                    tar.add(out.path / name, arcname=name)
        data = buffer.getvalue()
    data = distribute.broadcast_from_chief(strategy, data)
    if distribute.is_chief(strategy):
        return
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            if not _is_run_state(member.name) or not member.isfile():
                raise TrainError(f"unexpected file {member.name!r} in the chief's run state")
            if "/" in member.name:
                out.subdir(member.name.split("/")[0])
            with out.replacing(member.name) as tmp:
                tmp.write_bytes(tar.extractfile(member).read())


def _inputs(config: TrainConfig, data_dir, stream_weights, run_id: int):
    """(training dataset function of (phase, first epoch), validation dataset function,
    validation shares) for the loop: local pipelines, or the tf.data service."""
    import pneumo_data
    from pneumo_data import service
    p, d = config.pipeline, config.distribution
    stream = dataclasses.replace(p, verify_checksums=False)

    def train_fn(phase: int, first_epoch: int):
        if d.data_service:
            # Every trainer of this run computes the same name (one shared job); a restart
            # gets a new run id, a new phase or epoch a new job.
            job = f"pneumo-{run_id:012x}-p{phase}-e{first_epoch}"
            return lambda ctx: service.train_dataset_from_config(
                data_dir, d.data_service, stream, seed=config.seed, class_weights=stream_weights,
                job_name=job, input_context=ctx)
        return lambda ctx: pneumo_data.train_dataset_from_config(
            data_dir, stream, seed=config.seed, deterministic=config.deterministic,
            class_weights=stream_weights, input_context=ctx)

    if d.data_service:
        def val_fn(ctx):
            return service.eval_dataset(data_dir, "val", d.data_service,
                                        batch_size=p.batch_size, image_size=p.image_size,
                                        verify_checksums=False, input_context=ctx)

        def shares(pipelines):
            return pneumo_data.eval_shares(data_dir, "val", pipelines, shard="files")
        return train_fn, val_fn, shares

    def val_fn(ctx):
        return pneumo_data.eval_dataset(data_dir, "val", batch_size=p.batch_size,
                                        image_size=p.image_size, verify_checksums=False,
                                        input_context=ctx)
    return train_fn, val_fn, None


def _train(config: TrainConfig, out: OutputDir, m, counts: dict[str, int], strategy,
           run_id: int) -> dict[str, Any]:
    from pneumo_data.common.jobs import import_tensorflow
    tf = import_tensorflow()
    import keras

    import pneumo_data
    from pneumo_models import callbacks as cb
    from pneumo_models import distribute, models, optim
    from pneumo_models.export import export_into_model_dir
    from pneumo_models.loop import TrainingLoop
    from pneumo_models.precision import resolve_jit, resolve_precision

    p, d = config.pipeline, config.distribution
    tpu = distribute.is_tpu(strategy)
    chief = distribute.is_chief(strategy)
    # A TPU runs everything through XLA, natively in bfloat16.
    precision = "mixed_bfloat16" if tpu and config.precision == "auto" else \
        resolve_precision(config.precision)
    jit = True if tpu else resolve_jit(config.jit_compile)
    learning_rate = distribute.scale_learning_rate(config.optimizer.learning_rate, strategy,
                                                   d.lr_scaling)
    fine_tune_rate = distribute.scale_learning_rate(
        config.optimizer.fine_tune_learning_rate, strategy, d.lr_scaling)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    data_dir = m.data_dir
    described = distribute.describe(strategy)
    log.info("model %s, precision %s, XLA %s, augment %s, balance %s, deterministic %s, "
             "%s with %d replica(s), data %s%s", config.network.model, precision, jit, p.augment,
             config.balance, config.deterministic, described["strategy"],
             described["replicas"], data_dir,
             f" through the tf.data service {d.data_service}" if d.data_service else "")

    natural = {c: n / sum(counts.values()) for c, n in counts.items()}
    stream_weights = None if config.balance == "resample" else natural
    loss_weights = None
    if config.balance == "class_weight":
        loss_weights = {i: 1.0 / (len(counts) * natural[c]) for i, c in enumerate(m.classes)}
    train_fn, val_fn, val_shares = _inputs(config, data_dir, stream_weights, run_id)
    val_size = pneumo_data.eval_size(data_dir, "val")
    steps = config.steps_per_epoch or pneumo_data.steps_per_epoch(data_dir, p.batch_size)

    _share_run_state(strategy, out)
    state_path = out.path / "resume" / "state.json"
    state = read_json(state_path, "resume state") if state_path.exists() else None
    weights_file = out.path / "resume" / str((state or {}).get("weights"))
    if state is not None and not (cb.WEIGHTS_PATTERN.fullmatch(weights_file.name) and
                                  weights_file.is_file()):
        raise TrainError(f"{out.path / 'resume'} holds the resume state of an older version "
                         f"of this job, or its weights file is missing; pass --overwrite to "
                         f"start the run over")
    phase = state["phase"] if state else 1
    # The time budget's plan as saved (it is final from the second epoch on).
    plan = (state or {}).get("plan")
    with strategy.scope():  # its length is a variable: mirrored like the model's
        schedule = optim.schedule_for(config.optimizer, steps, plan or config.epochs,
                                      learning_rate)

    def build(weights: str):
        with strategy.scope():
            model = models.build_model(
                config.network.model, image_size=p.image_size, weights=weights,
                augment=p.augmentation if p.augment == "device" else False,
                augment_backend="gather" if jit else "kernel", precision=precision,
                dropout=config.network.resolved_dropout, seed=config.seed,
                preprocessing=config.network.resolved_preprocessing, crop=config.network.crop)
            _compile(model, config, schedule, jit)
        return model

    if state is None:
        model = build(config.network.weights)
        initial_epoch = 0
    else:
        # The model and optimizer come from the config, as at the start (so the optimizer's
        # weight-decay exclusions and the loss-scaling wrapper are the same objects), then
        # every variable from the resume state.
        model = build("none")
        if phase == 2:
            with strategy.scope():
                models.unfreeze_for_fine_tuning(model, FINE_TUNE_PREFIX[config.network.model])
                _compile(model, config, fine_tune_rate, jit)
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)
        model.load_weights(weights_file)
        initial_epoch = state["epoch"] + 1
        log.info("resuming from %s: epoch %d, phase %d", out.path / "resume",
                 initial_epoch + 1, phase)
    budget = cb.TimeBudget(
        config.time_budget_minutes, config.epochs, steps, schedule,
        plan=plan, seconds=(state or {}).get("seconds", 0.0),
        agree=lambda planned: distribute.broadcast_json(strategy, planned))

    history_path = out.claim("history.csv")
    _truncate_history(out, initial_epoch)
    logs_dir = out.subdir("logs")

    def loop_for(model):
        return TrainingLoop(model, strategy, optimizer=model.optimizer, loss=model.loss,
                            class_weight=loss_weights,
                            steps_per_execution=d.steps_per_execution, jit_compile=jit)

    validation = loop_for(model).eval_input(val_fn, num_examples=val_size,
                                            batch_size=p.batch_size, shares=val_shares)

    def run_phase(phase_no: int, first: int, last: int):
        guard = cb.NaNGuard()
        callbacks = [
            cb.Throughput(p.batch_size), guard,
            keras.callbacks.CSVLogger(str(history_path), append=True),
            keras.callbacks.TensorBoard(str(logs_dir)),
            cb.BestCheckpoint(out, "best.keras", initial_best=_best_so_far(history_path)),
        ]
        if phase_no == 1:
            callbacks.append(budget)  # before Resume, which saves its plan
        callbacks.append(cb.Resume(out, phase_no, guard, budget))
        if config.early_stopping_patience:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_auc", mode="max", patience=config.early_stopping_patience))
        verbose = (1 if sys.stdout.isatty() else 2) if chief else 0
        history = loop_for(model).fit(
            train_fn(phase_no, first), batch_size=p.batch_size, steps_per_epoch=steps,
            epochs=last, initial_epoch=first, validation=validation, callbacks=callbacks,
            verbose=verbose)
        if guard.where is not None:
            epoch, batch, loss = guard.where
            raise TrainError(
                f"the loss became {loss} at epoch {epoch}, batch {batch}; training stopped. "
                f"Try a lower --learning_rate, or --precision=float32. The last good epoch is "
                f"kept in {out.path / 'resume'} (pass --overwrite to start over).")
        return (first + len(history.epoch)) if history.epoch else first

    finished = bool((state or {}).get("finished"))
    if phase == 1:
        # The budget stops the run at its plan; a plan saved after the first epoch only may
        # still change at the second, so the loop runs to --epochs unless the plan is final.
        last = plan if plan and (initial_epoch >= 2 or initial_epoch >= plan) else config.epochs
        done = initial_epoch if finished else run_phase(1, initial_epoch, last)
        _mark_finished(out)
        if config.fine_tune_epochs:
            with strategy.scope():
                if config.ship == "best" and (out.path / "best.keras").exists():
                    model = models.load_model(out.path / "best.keras")
                opened = models.unfreeze_for_fine_tuning(
                    model, FINE_TUNE_PREFIX[config.network.model])
                log.info("fine-tuning: %d backbone layers trainable, learning rate %g", opened,
                         fine_tune_rate)
                _compile(model, config, fine_tune_rate, jit)
            phase, initial_epoch = 2, done
            out.write_json("resume/phase2.json", {"start": done})
    if phase == 2:
        start = read_json(out.path / "resume" / "phase2.json", "resume state")["start"]
        if not (finished and state["phase"] == 2):
            run_phase(2, initial_epoch, start + config.fine_tune_epochs)
        _mark_finished(out)
    divergence = distribute.replica_divergence(strategy, model.weights)

    best_path = out.path / "best.keras"
    with strategy.scope():
        final = models.load_model(best_path) if config.ship == "best" and \
            best_path.exists() else model
    with out.replacing("model.keras") as tmp:
        final.save(tmp)
    export_into_model_dir(out, final, m.preprocess,
                          model_sha256=file_sha256(out.path / "model.keras"))
    out.seal("logs")
    metrics = loop_for(final).evaluate(validation)
    run = {
        "model": config.network.model, "recipe": config.recipe, "ship": config.ship,
        "precision": precision, "jit_compile": jit,
        "deterministic": config.deterministic, "seed": config.seed,
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "distribution": {**described, "steps_per_execution": d.steps_per_execution,
                         "lr_scaling": d.lr_scaling, "learning_rate": learning_rate,
                         "data_service": d.data_service, "replica_divergence": divergence},
        "data_dir": os.path.relpath(Path(data_dir).resolve(), out.path.resolve()),
        "data_manifest_created": m.data["created"], "train_counts": counts,
        "val_metrics": {k: float(v) for k, v in metrics.items()},
        "history": _read_history(history_path),
        "time_budget": budget.record(),
    }
    out.write_json("run.json", run)
    out.remove("resume")
    log.info("done: val AUC %.4f, model in %s", run["val_metrics"].get("auc", float("nan")),
             out.path)
    return run


def _mark_finished(out: OutputDir) -> None:
    """Records in the resume state that its phase ended (its last epoch, or early stopping),
    so a run killed after that point does not train that phase again."""
    path = out.path / "resume" / "state.json"
    if path.exists():
        state = read_json(path, "resume state")
        if not state.get("finished"):
            out.write_json("resume/state.json", {**state, "finished": True})


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
        # strict: a config.json of an older version lacks options whose defaults changed
        # since; reading it with today's defaults would misstate the run. (It never holds
        # --overwrite, which is not part of a run's identity.)
        return config_from_dict(TrainConfig, {"overwrite": False, **data}
                                if isinstance(data, dict) else data, strict=True)
    except (TypeError, ValueError) as error:
        raise TrainError(f"{model_dir}/config.json does not match this version's options "
                         f"({error}); it was written by another version of the training "
                         f"job") from None


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
