"""The configs of the network, the optimizer and the devices, and the training job's choices
and error (no TensorFlow here, so jobs import them before TensorFlow is loaded). The training
job's config holds one of each."""

from __future__ import annotations

import dataclasses
import math

from pneumo_data.common.config import option
from pneumo_data.common.errors import UserError

MODELS = ("bn_cnn", "manual_cnn", "vgg16", "resnet50")
FINE_TUNE_PREFIX = {"vgg16": "block5", "resnet50": "conv5"}  # the block a second phase opens
SMALL_NETWORKS = ("bn_cnn", "manual_cnn")  # trained from scratch on one grey channel
PREPROCESSING = ("auto", "unit", "standardize", "caffe")
STEMS = ("auto", "conv", "patch4")  # bn_cnn's first stage (issue 20)

# What "auto"/None resolve to for each network (architecture defaults, see models.py).
NETWORK_DEFAULTS = {
    "bn_cnn": {"dropout": 0.3, "preprocessing": "standardize", "stem": "patch4"},
    "manual_cnn": {"dropout": 0.5, "preprocessing": "standardize", "stem": "conv"},
    "vgg16": {"dropout": 0.5, "preprocessing": "caffe", "stem": "conv"},
    "resnet50": {"dropout": 0.0, "preprocessing": "caffe", "stem": "conv"},  # no dropout
}
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
JIT_CHOICES = ("auto", "true", "false")


class TrainError(UserError):
    """The training job cannot start or could not finish; the message says why."""


def network_default(model: str, name: str, value=None):
    """``value``, or the network's default for ``name`` when ``value`` is None or "auto"."""
    if value is not None and value != "auto":
        return value
    if model not in NETWORK_DEFAULTS:
        raise UserError(f"unknown model {model!r}; choose one of {MODELS}")
    return NETWORK_DEFAULTS[model][name]


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Which network, with which weights and which input preprocessing (inside the model)."""

    model: str = option("bn_cnn", "Network: bn_cnn (batch-norm CNN with global pooling, the "
                                  "default), manual_cnn (the seed's CNN, exactly), vgg16, "
                                  "resnet50.", choices=MODELS)
    weights: str = option("auto", "imagenet, none, auto (imagenet for vgg16/resnet50, none "
                                  "for bn_cnn/manual_cnn) or a weights file path.")
    dropout: float | None = option(None, "Dropout rate before the output layer (default: the "
                                         "network's: 0.3 bn_cnn, 0.5 manual_cnn and vgg16).")
    preprocessing: str = option(
        "auto", "Input preprocessing inside the model: unit (x/255, the seed's), standardize "
                "(per image (x - mean) / max(std, 1 grey level)), caffe (ImageNet, the "
                "backbones'); auto: standardize for bn_cnn/manual_cnn, caffe for the backbones.",
        choices=PREPROCESSING)
    crop: float = option(0.0, "Fraction of the side cut from each border inside the model, "
                              "before the network (0: none; e.g. 0.05 drops burned-in labels "
                              "at the edges).")
    stem: str = option(
        "auto", "bn_cnn's first stage: patch4 (4x4 space-to-depth to 38 px, 16 channels, then "
                "one 32-filter 3x3 conv; issue 20: 1.9x the float32 training speed of conv on "
                "an AVX2 CPU at equal quality) or conv (the issue-10 stem: 3x3 stride-2 conv to "
                "75 px, 24 filters, then a 32-filter conv and max-pool); auto: patch4 for "
                "bn_cnn (the other networks have no stem option).",
        choices=STEMS)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise UserError(f"--model must be one of {MODELS}, got {self.model!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.crop < 0.25:
            raise UserError(f"--crop must be in [0, 0.25), got {self.crop}")
        if self.stem not in STEMS:
            raise UserError(f"--stem must be one of {STEMS}, got {self.stem!r}")
        if self.stem not in ("auto", "conv") and self.model != "bn_cnn":
            raise UserError(f"--stem={self.stem} is an option of bn_cnn, not {self.model}")
        mode = self.resolved_preprocessing
        if self.model in SMALL_NETWORKS and mode == "caffe":
            raise UserError(f"--preprocessing=caffe is the ImageNet backbones'; {self.model} "
                            f"takes unit or standardize")
        if self.model not in SMALL_NETWORKS and mode != "caffe":
            raise UserError(f"{self.model} takes its ImageNet preprocessing (--preprocessing="
                            f"caffe or auto), not {mode}")

    @property
    def resolved_preprocessing(self) -> str:
        return network_default(self.model, "preprocessing", self.preprocessing)

    @property
    def resolved_stem(self) -> str:
        return network_default(self.model, "stem", self.stem)

    @property
    def resolved_dropout(self) -> float:
        return network_default(self.model, "dropout", self.dropout)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer, its learning-rate schedule and the loss's label smoothing."""

    optimizer: str = option("adamw", "adamw (decoupled weight decay, not on biases and batch-norm "
                                     "scales/offsets) or adam.", choices=OPTIMIZERS)
    learning_rate: float = option(2e-3, "Peak learning rate (after the warmup).")
    weight_decay: float = option(0.05, "AdamW's decoupled weight decay (0 with adam).")
    warmup_epochs: float = option(1.0, "Linear warmup from 1% of the learning rate over this "
                                       "many epochs (0: none).")
    schedule: str = option("cosine", "After the warmup: cosine (decay to --lr_floor x the "
                                     "learning rate at the last epoch) or constant.",
                           choices=SCHEDULES)
    lr_floor: float = option(0.01, "Where the cosine ends and the warmup starts, as a fraction "
                                   "of the learning rate.")
    label_smoothing: float = option(0.1, "Binary cross-entropy label smoothing (0: none).")
    fine_tune_learning_rate: float = option(1e-5, "Learning rate of the fine-tuning phase.")
    ema_momentum: float = option(
        0.0, "Exponential moving average of the trainable weights, updated every step with this "
             "momentum (e.g. 0.99: about the last 100 steps); the averaged weights replace the "
             "trained ones at the end of each phase, so model.keras, the export and run.json's "
             "val metrics are the average's, and trained.keras keeps the last trained weights "
             "(0: off; history.csv and best.keras are the trained weights').")

    def validate(self) -> None:
        for name in ("learning_rate", "fine_tune_learning_rate"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"--{name} must be a positive number, got {value}")
        if not (0 <= self.weight_decay < 1):
            raise UserError(f"--weight_decay must be in [0, 1), got {self.weight_decay}")
        if self.weight_decay and self.optimizer != "adamw":
            raise UserError("--weight_decay needs --optimizer=adamw (Adam's would be L2 "
                            "through the gradient); pass --weight_decay=0 with adam")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise UserError(f"--warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 < self.lr_floor <= 1:
            raise UserError(f"--lr_floor must be in (0, 1], got {self.lr_floor}")
        if not 0 <= self.ema_momentum < 1:
            raise UserError(f"--ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing must be in [0, 0.5), got "
                            f"{self.label_smoothing}")

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
LR_SCALING = ("none", "linear")


@dataclasses.dataclass(frozen=True)
class DistributeConfig:
    """Which devices train, how the learning rate follows them, and where the input comes
    from (see :mod:`pneumo_models.distribute`)."""

    strategy: str = option(
        "auto", "auto: one device, or MirroredStrategy over every GPU when several are visible; "
                "one_device; mirrored (every local GPU); multi_worker "
                "(MultiWorkerMirroredStrategy, the cluster from TF_CONFIG); tpu.",
        choices=STRATEGIES)
    tpu: str | None = option(None, "--strategy=tpu: the TPU's name or grpc address (default: "
                                   "TPU_NAME, else the TPU VM the job runs on).")
    lr_scaling: str = option(
        "none", "none: the learning rates as given; linear: multiplied by the number of replicas "
                "(for a --batch_size grown with the replicas; Goyal et al. 2017).",
        choices=LR_SCALING)
    steps_per_execution: int = option(
        1, "Training steps per tf.function call (callbacks see one batch end per call); more "
           "can help where steps are short (GPUs, TPUs).")
    data_service_timeout: float = option(
        60.0, "Seconds the tf.data service (--data_service) has to hand out its first data "
              "before the job stops with an error (no dispatcher there, or no worker).")
    data_service: str | None = option(
        None, "grpc://HOST:PORT of a tf.data service dispatcher: the training stream (and "
              "validation) is produced by its workers (python -m pneumo_data.service).")
