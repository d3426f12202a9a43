"""The training job's stages that run TensorFlow: model, loop and export (see
:func:`pneumo_models.train.train`, which calls :func:`run` once its checks have passed).

::

    numerics  precision, XLA, learning rates, determinism and the seed, decided per device
    inputs    the training stream and the validation set (pneumo_data.read), per replica
    model     built from the config, or rebuilt and loaded from the resume state
    loop      the time budget, callbacks and phases (a second phase fine-tunes a backbone)
    export    the batch-norm statistics recomputed for the shipped weights, model.keras,
              the serving SavedModel, the final val metrics, run.json

With ``--ema_momentum`` the optimizer keeps a moving average of the trainable weights and the
loop writes it into the model at the end of each phase (:meth:`TrainingLoop.finalize`, the
same for the stream and the device-resident set): the shipped ``model.keras``, its export and
run.json's val metrics are the average's; ``trained.keras`` keeps the last trained weights.

The files all go through :class:`pneumo_models.rundir.RunDir` and the job's OutputDir.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import keras
import tensorflow as tf

from pneumo_data import reader, resident
from pneumo_data.common.config import with_leaves
from pneumo_data.common.files import file_sha256
from pneumo_data.common.jobs import verbosity
from pneumo_data.common.outputs import OutputDir
from pneumo_data.config import AugmentConfig
from pneumo_models import bn_stats, cluster, distribute, models, optim
from pneumo_models import callbacks as cb
from pneumo_models import probe as probe_lib
from pneumo_models.config import FINE_TUNE_PREFIX, TrainError
from pneumo_models.export_dir import export_into_model_dir
from pneumo_models.loop import EvalInput, TrainingLoop
from pneumo_models.precision import resolve_jit, resolve_precision
from pneumo_models.rundir import (
    BEST,
    HISTORY,
    LOGS,
    RESUME,
    TRAINED,
    RunDir,
    RunDirError,
    RunRecord,
)

log = logging.getLogger("pneumo.train")

BN_STATS_BATCH = 128  # images per call of the batch-norm statistics pass (at least)


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How this device trains: decided once, recorded in run.json."""

    precision: str
    jit: bool
    learning_rate: float
    fine_tune_rate: float


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The training stream (a function of phase and first epoch, for the loop) and the
    validation set."""

    train_fn: Callable
    val_fn: Callable
    val_shares: Callable | None
    val_size: int
    steps: int
    loss_weights: dict[int, float] | None
    resident: Any = None  # a pneumo_data.resident.ResidentTrainSet, drawn inside the step
    residency: str = "stream"  # what the run trains from, and why when it fell back

    def resume_state(self) -> dict[str, Any]:
        """What a resume needs of the input besides the weights: the resident set's walk."""
        return {"resident": self.resident.checkpoint_state()} if self.resident else {}


def run(config, run_dir: RunDir, out: OutputDir, m, counts: dict[str, int], strategy,
        run_id: int) -> dict[str, Any]:
    """Trains, ships and exports the model of ``config`` into ``run_dir``; returns run.json."""
    numerics = _numerics(config, strategy, m.data_dir)
    cluster.share_run_state(strategy, out)
    try:
        state = run_dir.resume_state()
    except RunDirError as error:
        raise TrainError(str(error)) from None
    phase = state["phase"] if state else 1
    # --budget_plan=probe: the image size and epochs planned before training (or as saved)
    config, probe, probe_seconds = _budget_plan(config, state, m, counts, numerics, strategy)
    inputs = _inputs(config, m, counts, run_id, strategy)
    _restore_input(inputs, state)

    # ---- model: new, or rebuilt from the config and loaded from the resume state
    # the time budget's plan as saved (final from epoch 2), or the probe's
    plan = (state or {}).get("plan") or (probe or {}).get("epochs")
    with strategy.scope():  # its length is a variable: mirrored like the model's
        schedule = optim.schedule_for(config.optimizer, inputs.steps, plan or config.epochs,
                                      numerics.learning_rate)
    model, initial_epoch = _model(config, strategy, numerics, schedule, run_dir, state, phase)
    if (state or {}).get("finished"):
        # The phase's epochs all ran in an earlier process: its resume weights are the trained
        # ones; with --ema_momentum the loaded optimizer's average replaces them, as at the
        # end of that phase's fit (a no-op without an average).
        _loop(model, strategy, numerics, inputs, config).finalize()

    # ---- loop: the time budget, the callbacks, one or two phases
    budget = cb.TimeBudget(
        config.time_budget_minutes, config.epochs, inputs.steps, schedule,
        plan=plan, seconds=(state or {}).get("seconds", probe_seconds),
        agree=lambda planned: cluster.broadcast_json(strategy, planned),
        image_size=config.pipeline.image_size if probe else None, probe=probe)
    out.claim(HISTORY)
    run_dir.truncate_history(out, initial_epoch)
    out.subdir(LOGS)
    validation = _loop(model, strategy, numerics, inputs, config).eval_input(
        inputs.val_fn, num_examples=inputs.val_size, batch_size=config.pipeline.batch_size,
        shares=inputs.val_shares)
    fit = _Fit(config, run_dir, out, strategy, numerics, inputs, validation, budget,
               m.split_digests())
    finished = bool((state or {}).get("finished"))
    if phase == 1:
        # The budget stops the run at its plan; a plan saved after the first epoch only may
        # still change at the second, so the loop runs to --epochs unless the plan is final.
        last = plan if plan and (initial_epoch >= 2 or initial_epoch >= plan) else config.epochs
        done = initial_epoch if finished else fit.phase(model, 1, initial_epoch, last)
        run_dir.mark_finished(out)
        if config.fine_tune_epochs:
            model = _open_backbone(config, strategy, numerics, run_dir, model)
            phase, initial_epoch = 2, done
            run_dir.write_phase2_start(out, done)
    if phase == 2:
        start = run_dir.phase2_start()
        if not (finished and state["phase"] == 2):
            fit.phase(model, 2, initial_epoch, start + config.fine_tune_epochs)
        run_dir.mark_finished(out)

    # ---- export: the shipped model, its SavedModel, the final val metrics, run.json
    divergence = cluster.replica_divergence(strategy, model.weights)
    with strategy.scope():
        final = models.load_model(run_dir.best_path) if config.ship == "best" and \
            run_dir.best_path.exists() else model
    _recompute_bn_stats(config, final, m, counts, strategy)
    with out.replacing(run_dir.model_path.name) as tmp:
        final.save(tmp)
    export_into_model_dir(out, final, m.preprocess,
                          model_sha256=file_sha256(run_dir.model_path))
    out.seal(LOGS)
    metrics = _loop(final, strategy, numerics, inputs, config).evaluate(validation)
    d = config.distribution
    record = RunRecord(
        model=config.network.model, recipe=config.recipe, ship=config.ship,
        precision=numerics.precision, jit_compile=numerics.jit,
        deterministic=config.deterministic, seed=config.seed,
        tensorflow=tf.__version__, keras=keras.__version__,
        distribution={**distribute.describe(strategy),
                      "steps_per_execution": d.steps_per_execution,
                      "lr_scaling": d.lr_scaling, "learning_rate": numerics.learning_rate,
                      "data_service": d.data_service, "residency": inputs.residency,
                      "replica_divergence": divergence},
        data_dir=_relative(m.data_dir, run_dir.path),
        data_manifest_created=m.data["created"], data_splits=m.split_digests(),
        train_counts=counts,
        val_metrics={k: float(v) for k, v in metrics.items()},
        history=run_dir.history(), time_budget=budget.record())
    run_dir.write_record(out, record)
    out.remove(RESUME)
    log.info("done: val AUC %.4f, model in %s", record.val_metrics.get("auc", float("nan")),
             run_dir.path)
    return record.to_dict()


def _recompute_bn_stats(config, model, m, counts: dict[str, int], strategy) -> None:
    """``--bn_stats_images``: the shipped model's batch-norm statistics recomputed for its
    weights (:mod:`pneumo_models.bn_stats`) from the training stream without augmentation,
    read here the same way by every worker (same seed, no sharding), so every copy of the
    model gets the same ones."""
    if not config.bn_stats_images or not bn_stats.trainable_batch_norms(model):
        return
    # Batches of at least 128: each is one eager call of the model, whose overhead dominates
    # at small sizes (the statistics are averaged over the batches either way).
    batch_size = max(config.pipeline.batch_size, BN_STATS_BATCH)
    stream = dataclasses.replace(config.pipeline, verify_checksums=False, residency="stream",
                                 augmentation=AugmentConfig.off(), batch_size=batch_size)
    # deterministic: every worker of a cluster must compute the same statistics
    batches = reader.read(m.data_dir, stream, mode="train", seed=config.seed,
                          deterministic=True, class_weights=_stream_weights(config, counts))
    with strategy.scope():
        used = bn_stats.recompute(model, batches, config.bn_stats_images, batch_size)
    log.info("batch-norm statistics recomputed for the shipped weights over %d training "
             "images", used)


# ---------------------------------------------------------------- numerics and inputs

def _numerics(config, strategy, data_dir) -> Numerics:
    """Precision, XLA and learning rates for this device; determinism and the seed set."""
    p, d = config.pipeline, config.distribution
    tpu = distribute.is_tpu(strategy)
    # A TPU runs everything through XLA, natively in bfloat16.
    precision = "mixed_bfloat16" if tpu and config.precision == "auto" else \
        resolve_precision(config.precision)
    jit = True if tpu else resolve_jit(config.jit_compile)
    numerics = Numerics(
        precision=precision, jit=jit,
        learning_rate=distribute.scale_learning_rate(config.optimizer.learning_rate, strategy,
                                                     d.lr_scaling),
        fine_tune_rate=distribute.scale_learning_rate(config.optimizer.fine_tune_learning_rate,
                                                      strategy, d.lr_scaling))
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    described = distribute.describe(strategy)
    log.info("model %s, precision %s, XLA %s, augment %s, balance %s, deterministic %s, "
             "%s with %d replica(s), data %s%s", config.network.model, precision, jit, p.augment,
             config.balance, config.deterministic, described["strategy"],
             described["replicas"], data_dir,
             f" through the tf.data service {d.data_service}" if d.data_service else "")
    return numerics


def _natural(counts: dict[str, int]) -> dict[str, float]:
    return {c: n / sum(counts.values()) for c, n in counts.items()}


def _stream_weights(config, counts: dict[str, int]) -> dict[str, float] | None:
    """The training stream's class mix: balanced (None) or the natural one."""
    return None if config.balance == "resample" else _natural(counts)


def _steps(config, data_dir) -> int:
    return config.steps_per_epoch or reader.steps_per_epoch(data_dir, config.pipeline.batch_size)


def _budget_plan(config, state, m, counts: dict[str, int], numerics: Numerics, strategy):
    """``--budget_plan=probe``: (the config at the planned image size, the probe's plan or
    None, the seconds the probe took). The probe times a few steps of a throwaway network on
    one batch of the training stream (:func:`pneumo_models.probe.plan_from_probe`); a resumed
    run keeps the size and plan its resume state saved."""
    seconds = 0.0
    if state is not None:
        size, probe = state.get("image_size"), state.get("probe")
    elif config.time_budget_minutes and config.budget_plan == "probe":
        stream = dataclasses.replace(config.pipeline, verify_checksums=False,
                                     residency="stream")
        batch = next(iter(reader.read(m.data_dir, stream, mode="train", seed=config.seed,
                                      class_weights=_stream_weights(config, counts))))
        probe, seconds = probe_lib.plan_from_probe(
            config, batch, precision=numerics.precision,
            steps_per_epoch=_steps(config, m.data_dir),
            val_images=reader.eval_size(m.data_dir, "val"), strategy=strategy)
        size = probe["image_size"]
    else:
        return config, None, seconds
    if size and int(size) != config.pipeline.image_size:
        config = with_leaves(config, image_size=int(size))
    return config, probe, seconds


def _inputs(config, m, counts: dict[str, int], run_id: int, strategy) -> Inputs:
    """The training input (a device-resident set, or the stream: local pipelines or the
    tf.data service) and the validation set."""
    p, d = config.pipeline, config.distribution
    data_dir = m.data_dir
    natural = _natural(counts)
    stream_weights = _stream_weights(config, counts)
    loss_weights = None
    if config.balance == "class_weight":
        loss_weights = {i: 1.0 / (len(counts) * natural[c]) for i, c in enumerate(m.classes)}
    stream = dataclasses.replace(p, verify_checksums=False)  # checked before training

    def train_fn(phase: int, first_epoch: int):
        # Every trainer of this run computes the same job name (one shared job); a restart
        # gets a new run id, a new phase or epoch a new job.
        job = f"pneumo-{run_id:012x}-p{phase}-e{first_epoch}" if d.data_service else None
        return lambda ctx: reader.read(
            data_dir, stream, mode="train", seed=config.seed, deterministic=config.deterministic,
            class_weights=stream_weights, input_context=ctx, service=d.data_service,
            job_name=job)

    def val_fn(ctx):
        return reader.read(data_dir, stream, mode="eval", split="val", input_context=ctx,
                           service=d.data_service)

    shares = (lambda pipelines: reader.eval_shares(data_dir, "val", pipelines, shard="files")) \
        if d.data_service else None
    resident_set, residency = None, "stream"
    if p.residency != "stream" and not d.data_service:
        try:  # memory checked before anything is placed; the set read once, here
            resident_set = resident.resident_train_set(
                data_dir, stream, seed=config.seed, deterministic=config.deterministic,
                class_weights=stream_weights, strategy=strategy)
            residency = "device"
            log.info("train split resident in device memory: %d images, %.1f MB per device",
                     resident_set.count, resident_set.nbytes / 2 ** 20)
        except resident.ResidentRefused as refused:
            residency = f"stream ({refused})"
            log.warning("--residency=%s: streaming instead: %s", p.residency, refused)
    if resident_set is not None:  # the loop draws from the set inside the step
        train_fn = lambda phase, first_epoch: resident_set  # noqa: E731
    return Inputs(train_fn, val_fn, shares, reader.eval_size(data_dir, "val"),
                  _steps(config, data_dir), loss_weights, resident_set, residency)


def _restore_input(inputs: Inputs, state) -> None:
    """A resumed run continues the resident set's walk where the saved epoch left it."""
    if inputs.resident is None or not state:
        return
    saved = state.get("resident")
    if saved is None:  # the earlier process streamed (the set did not fit then)
        log.warning("resuming with the resident set, whose walk the saved state does not "
                    "hold: it starts a new walk")
        return
    try:
        inputs.resident.restore(saved)
    except ValueError as error:
        raise TrainError(f"cannot resume the resident set's walk: {error}") from None


# ---------------------------------------------------------------- model

def _compile(model, config, learning_rate, jit: bool) -> None:
    """Gives ``model`` the optimizer and loss of a training phase (created inside the
    strategy's scope by the caller): ``learning_rate`` is a float or a schedule. The
    training loop uses exactly these objects (``model.optimizer``, ``model.loss``), and
    saved models keep the optimizer's state. Metrics are the loop's own."""
    model.compile(optimizer=optim.make_optimizer(config.optimizer, learning_rate),
                  loss=optim.make_loss(config.optimizer), jit_compile=jit)


def _model(config, strategy, numerics: Numerics, schedule, run_dir: RunDir, state, phase
           ) -> tuple[keras.Model, int]:
    """(the model, the first epoch to train): built from the config, or from the config and
    then every variable from the resume state."""
    p, network = config.pipeline, config.network

    def build(weights: str):
        with strategy.scope():
            model = models.build_model(
                network.model, image_size=p.image_size, weights=weights,
                augment=p.augmentation if p.augment == "device" else False,
                augment_backend="gather" if numerics.jit else "fused",
                precision=numerics.precision, dropout=network.resolved_dropout,
                seed=config.seed, preprocessing=network.resolved_preprocessing,
                crop=network.crop, stem=network.resolved_stem)
            _compile(model, config, schedule, numerics.jit)
        return model

    if state is None:
        return build(network.weights), 0
    # The model and optimizer come from the config, as at the start (so the optimizer's
    # weight-decay exclusions and the loss-scaling wrapper are the same objects), then
    # every variable from the resume state.
    model = build("none")
    if phase == 2:
        with strategy.scope():
            models.unfreeze_for_fine_tuning(model, FINE_TUNE_PREFIX[network.model])
            _compile(model, config, numerics.fine_tune_rate, numerics.jit)
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)
    model.load_weights(run_dir.resume_weights(state))
    initial_epoch = state["epoch"] + 1
    log.info("resuming from %s: epoch %d, phase %d", run_dir.path / RESUME,
             initial_epoch + 1, phase)
    return model, initial_epoch


def _open_backbone(config, strategy, numerics: Numerics, run_dir: RunDir, model):
    """The model of the fine-tuning phase: the backbone's last block trainable."""
    with strategy.scope():
        if config.ship == "best" and run_dir.best_path.exists():
            model = models.load_model(run_dir.best_path)
        opened = models.unfreeze_for_fine_tuning(model, FINE_TUNE_PREFIX[config.network.model])
        log.info("fine-tuning: %d backbone layers trainable, learning rate %g", opened,
                 numerics.fine_tune_rate)
        _compile(model, config, numerics.fine_tune_rate, numerics.jit)
    return model


# ---------------------------------------------------------------- loop

def _loop(model, strategy, numerics: Numerics, inputs: Inputs, config) -> TrainingLoop:
    return TrainingLoop(model, strategy, optimizer=model.optimizer, loss=model.loss,
                        class_weight=inputs.loss_weights,
                        steps_per_execution=config.distribution.steps_per_execution,
                        jit_compile=numerics.jit)


@dataclasses.dataclass
class _Fit:
    """Runs a phase of epochs with the job's callbacks."""

    config: Any
    run_dir: RunDir
    out: OutputDir
    strategy: Any
    numerics: Numerics
    inputs: Inputs
    validation: EvalInput
    budget: cb.TimeBudget
    data_splits: dict[str, str]

    def phase(self, model, phase_no: int, first: int, last: int) -> int:
        """Epochs ``first .. last-1`` of phase ``phase_no``; returns the epoch reached."""
        config, run_dir, out = self.config, self.run_dir, self.out
        batch = config.pipeline.batch_size
        guard = cb.NaNGuard()
        callbacks = [
            cb.Throughput(batch), guard,
            keras.callbacks.CSVLogger(str(run_dir.history_path), append=True),
            keras.callbacks.TensorBoard(str(run_dir.logs_path)),
            cb.BestCheckpoint(out, BEST, initial_best=run_dir.best_so_far()),
        ]
        if config.optimizer.ema_momentum:  # the shipped model is the average: keep these too
            callbacks.append(cb.KeepTrainedWeights(out, TRAINED))
        if phase_no == 1:
            callbacks.append(self.budget)  # before Resume, which saves its plan
        callbacks.append(cb.Resume(out, run_dir, phase_no, guard, self.budget,
                                   extra={"data_splits": self.data_splits},
                                   more=self.inputs.resume_state))
        if config.early_stopping_patience:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_auc", mode="max", patience=config.early_stopping_patience))
        chief = distribute.is_chief(self.strategy)
        verbose = 0 if not chief or verbosity() < 0 else (1 if sys.stdout.isatty() else 2)
        history = _loop(model, self.strategy, self.numerics, self.inputs, config).fit(
            self.inputs.train_fn(phase_no, first), batch_size=batch,
            steps_per_epoch=self.inputs.steps, epochs=last, initial_epoch=first,
            validation=self.validation, callbacks=callbacks, verbose=verbose)
        if guard.where is not None:
            epoch, batch_no, loss = guard.where
            raise TrainError(
                f"the loss became {loss} at epoch {epoch}, batch {batch_no}; training stopped. "
                f"Try a lower --learning_rate, or --precision=float32. The last good epoch is "
                f"kept in {run_dir.path / RESUME} (pass --overwrite to start over).")
        return (first + len(history.epoch)) if history.epoch else first


def _relative(path, start) -> str:
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())
