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
    # the train split placed once in accelerator memory, batches drawn inside the step
    # (memory checked first; the stream, with a one-line reason, when it does not fit):
    python -m pneumo_models.train --data_dir=data/xray --model_dir=runs/cnn --residency=device

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
how many of ``--epochs`` fit and shortens the cosine so it still ends on the last of them;
``--budget_plan=probe`` plans the image size and the epochs before training instead, from a
few timed steps (:mod:`pneumo_models.budget`), and records the plan in run.json.
The files and their formats are :mod:`pneumo_models.rundir`'s.
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
(:func:`pneumo_models.tf_config.scratch_dir`), deleted at the end; the chief's decisions
reach the workers through :mod:`pneumo_models.cluster`.

Reading order: :class:`TrainConfig`, then :func:`train` in stages (checks, data, model, loop,
export). Everything before the ``TensorFlow`` stage imports no TensorFlow (a bad flag, a
missing folder or a busy model_dir is refused in about a second); the job's TensorFlow half is
imported in one place, at the start of that stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from pneumo_data import manifest
from pneumo_data.common.config import (
    config_to_dict,
    config_to_flagfile,
    group,
    option,
    with_leaves,
)
from pneumo_data.common.errors import UserError
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.common.outputs import OutputDir
from pneumo_data.config import PipelineConfig
from pneumo_data.prepare import PrepareConfig, prepare
from pneumo_data.service import (
    check_reachable,
    check_service,
    check_shards_for_service,
    service_address,
)
from pneumo_data.sources import presets
from pneumo_models import recipes, tf_config
from pneumo_models.config import (
    FINE_TUNE_PREFIX,
    JIT_CHOICES,
    PRECISIONS,
    DistributeConfig,
    NetworkConfig,
    OptimizerConfig,
    TrainError,
)
from pneumo_models.recipes import RECIPES
from pneumo_models.rundir import DATA, RunDir, RunDirError
from pneumo_models.weights import BACKBONES, imagenet_source

log = logging.getLogger("pneumo.train")

BALANCE_MODES = ("resample", "class_weight", "none")
SHIP_CHOICES = ("last", "best")
BUDGET_PLANS = ("epochs", "probe")

__all__ = ["TrainConfig", "TrainError", "train", "train_config"]

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
    bn_stats_images: int = option(
        1024, "Before the model is shipped, its batch-norm layers' moving mean and variance "
              "are recomputed as their average over this many training images (the stream's "
              "class mix, no augmentation, dropout off), for the shipped weights: after a "
              "short run, with "
              "--ema_momentum or with --ship=best the moving averages are not those weights' "
              "statistics (0: keep the moving averages; networks without batch norm, or with "
              "it frozen, are unchanged).")
    time_budget_minutes: float = option(
        13.0, "Training time budget: after the first and second epochs the job plans as "
              "many epochs as fit (at most --epochs) and the schedule ends on the last of "
              "them (0: none).")
    budget_plan: str = option(
        "epochs", "How the time budget plans: epochs (after the first and second epochs, "
                  "cutting epochs only) or probe (before training, from a few timed steps of "
                  "a throwaway copy of the network: cuts epochs above 5 first, then the image "
                  "size down to 128 and 112 px, see pneumo_models.budget; the epoch-end "
                  "replanning still applies).", choices=BUDGET_PLANS)
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
        return recipes.resolve(config, given)

    def resolved_model_dir(self) -> Path:
        return Path(self.model_dir or Path("runs") / self.network.model)

    def identity(self) -> dict[str, Any]:
        """The options that define the run (a re-run with equal ones resumes or is a no-op):
        all but --overwrite and --data_service_timeout, which only say how to run it."""
        values = config_to_dict(self)
        values.pop("overwrite")
        values["distribution"].pop("data_service_timeout")
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
        if self.bn_stats_images < 0:
            raise TrainError(f"--bn_stats_images must be >= 0, got {self.bn_stats_images}")
        if not (self.time_budget_minutes >= 0 and math.isfinite(self.time_budget_minutes)):
            raise TrainError(f"--time_budget_minutes must be >= 0, got "
                             f"{self.time_budget_minutes}")
        if self.budget_plan == "probe" and not self.time_budget_minutes:
            raise TrainError("--budget_plan=probe plans a time budget: give "
                             "--time_budget_minutes (the default recipe's is 13)")
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
        if not (d.data_service_timeout > 0 and math.isfinite(d.data_service_timeout)):
            raise TrainError(f"--data_service_timeout must be a positive number of seconds, "
                             f"got {d.data_service_timeout}")
        if d.data_service and p.residency == "device":
            raise TrainError("--residency=device places the train split in device memory; "
                             "--data_service streams it from service workers. Drop one")
        if not (p.residency_budget_mb >= 0 and math.isfinite(p.residency_budget_mb)):
            raise TrainError(f"--residency_budget_mb must be >= 0, got "
                             f"{p.residency_budget_mb}")
        if d.data_service:
            service_address(d.data_service)  # a clear error for a malformed address
            if self.deterministic:
                raise TrainError(
                    "--deterministic cannot hold with --data_service: which service worker "
                    "reads which file, and the order batches arrive in, depend on timing. "
                    "Drop one of the two")


def train_config(recipe: str = "default", **options) -> TrainConfig:
    """A :class:`TrainConfig` for ``recipe``, ``options`` (leaf names, as the flags) overriding
    it: the Python equivalent of ``--recipe=RECIPE --name=value ...`` (see
    :mod:`pneumo_models.recipes`)."""
    if "recipe" in options:
        raise TypeError("pass the recipe as the first argument")
    config = with_leaves(TrainConfig(), recipe=recipe, **options)
    return recipes.resolve(config, options)


# ================================================================== the job

def train(config: TrainConfig) -> dict[str, Any]:
    """Runs the job; returns the contents of run.json.

    Under ``--strategy=multi_worker`` every worker runs this with the same config; the
    chief writes ``model_dir`` and returns its run.json, the others train in a scratch
    folder they delete at the end and return the same record.
    """
    # ---- 1. Checks, before anything is written and before TensorFlow loads.
    config.validate()
    if config.network.model in BACKBONES and config.network.weights in ("auto", "imagenet"):
        imagenet_source(config.network.model)  # offline and not cached: one line, now
    if config.source_dir:  # a wrong folder fails before anything is created
        presets.detect(Path(config.source_dir))
    given = None
    if config.data_dir:
        given = manifest.load_manifest(config.data_dir)
        _check_data(given, config)
    d = config.distribution
    if d.data_service:  # nothing listening there is known at once, without TensorFlow
        if given is not None:
            check_shards_for_service(given)
        check_reachable(d.data_service)
    chief, task = tf_config.role(d.strategy)  # TF_CONFIG checked before TensorFlow starts
    model_dir = config.resolved_model_dir()
    run = RunDir(model_dir if chief else tf_config.scratch_dir(model_dir, task))
    out = OutputDir(run.path, job="train")
    alone = d.strategy != "multi_worker"  # in a cluster, errors wait for the workers to agree
    complete, error = False, None
    if run.path.exists():  # a busy folder or another run is refused before TensorFlow loads
        complete, error = _open_run_folder(run, out, config, chief, given)
        if error is not None and alone:
            out.close()
            raise error

    # ---- 2. TensorFlow: the job's TensorFlow half is imported here, once.
    strategy = None
    try:
        import_tensorflow()
        from pneumo_models import cluster, distribute, training

        strategy = distribute.make_strategy(d.strategy, tpu=d.tpu)
        distribute.per_replica_batch_size(config.pipeline.batch_size, strategy)
        if d.data_service:  # a dispatcher with workers hands out data within the timeout
            check_service(d.data_service, d.data_service_timeout)
        if not out.is_open and error is None:  # a new folder: created now, checks passed
            complete, error = _open_run_folder(run, out, config, chief, given)
            if error is not None and alone:
                raise error
        complete, run_id = cluster.agree(strategy, task, complete, error)
        if complete:
            record = run.record().to_dict() if chief else None
            log.info("%s already holds this complete run; nothing to do", model_dir)
            return cluster.broadcast_json(strategy, record)
        if not chief:
            log.info("%s: training beside the chief; scratch folder %s (deleted at the end)",
                     task, run.path)
        # ---- 3. Data: the prepared folder (prepared here from --source_dir if needed).
        m = given or _prepared(config, out)
        counts = _check_data(m, config) if given is None else \
            {c: m.count("train", c) for c in m.classes}
        if d.data_service and given is None:
            check_shards_for_service(m)
        run.write_config(out, config.identity(), config_to_flagfile(_repeatable(config)))
        # ---- 4. Model, loop and export (pneumo_models.training).
        return training.run(config, run, out, m, counts, strategy, run_id)
    except Exception as error:
        if strategy is None or not (distribute.is_multi_worker(strategy)
                                    and distribute.is_peer_failure(error)):
            raise
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise TrainError(
            f"{task}: another worker of the cluster stopped or cannot be reached "
            f"({type(error).__name__}: {first}). Start every worker again with the same "
            f"command: the run resumes from its last finished epoch") from None
    finally:
        if chief or strategy is None or not out.is_open:
            out.close()
        else:
            cluster.remove_scratch(out)


def _same_run(config: TrainConfig, given, run: RunDir):
    """Whether a recorded run (its config.json) is this run: the same options; the model_dir
    wherever it is now (a moved or copied run resumes); and the same data: its folder given
    under the same resolved path, or moved but holding the splits the run recorded."""
    current = config.identity()
    paths = ("model_dir", "data_dir", "source_dir")

    def resolved(identity, key):
        value = identity.get(key)
        return None if value is None else Path(value).resolve()

    def same(recorded: dict) -> bool:
        if {k: v for k, v in recorded.items() if k not in paths} != \
                {k: v for k, v in current.items() if k not in paths}:
            return False
        if all(resolved(recorded, k) == resolved(current, k) for k in paths[1:]):
            return True
        moved = run.recorded_data_splits()
        return given is not None and moved is not None and moved == given.split_digests()

    return same


def _open_run_folder(run: RunDir, out: OutputDir, config: TrainConfig, chief: bool,
                     given=None):
    """Locks the run folder and decides what is in it: (complete, error). The chief finds
    this run complete, unfinished (it resumes) or another run (refused without
    --overwrite); another worker clears its earlier scratch (its state comes from the
    chief). A refusal is returned, not raised, so that a cluster's workers can agree on it."""
    try:
        out.open()
        if not chief:
            out.clear()
            return False, None
        return run.claim_previous(out, config.identity(), config.overwrite,
                                  same=_same_run(config, given, run)), None
    except RunDirError as error:
        return False, TrainError(str(error))
    except UserError as error:
        return False, error


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


def _repeatable(config: TrainConfig) -> TrainConfig:
    """The config as ``config.flags`` holds it: the same run again from any folder (its
    paths made absolute), never an overwrite."""
    def absolute(path):
        return os.path.abspath(path) if path else path
    return dataclasses.replace(config, overwrite=False, data_dir=absolute(config.data_dir),
                               source_dir=absolute(config.source_dir),
                               model_dir=absolute(config.model_dir))


def _prepared(config: TrainConfig, out: OutputDir):
    """The manifest of the run's data: --data_dir, or a prepare into MODEL_DIR/data."""
    if config.data_dir:
        return manifest.load_manifest(config.data_dir)
    data = out.nested(DATA, job="prepare")
    return prepare(PrepareConfig(source_dir=config.source_dir, output_dir=str(data),
                                 seed=config.seed, progress=sys.stderr.isatty()))


if __name__ == "__main__":
    from pneumo_data.common.jobs import run_job

    run_job("train", TrainConfig, train)
