"""The configs of the network and the optimizer (no TensorFlow here, so jobs import them before
TensorFlow is loaded). The training job's config holds one of each."""

from __future__ import annotations

import dataclasses

from pneumo_data.common.config import option

MODELS = ("manual_cnn", "vgg16", "resnet50")


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Which network, and with which weights."""

    model: str = option("manual_cnn", "Network.", choices=MODELS)
    weights: str = option("auto", "imagenet, none, auto (imagenet for vgg16/resnet50, none "
                                  "for manual_cnn) or a weights file path.")
    dropout: float = option(0.5, "Dropout rate before the output layer (manual_cnn, vgg16).")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer of each training phase."""

    learning_rate: float = option(1e-3, "Adam learning rate.")
    fine_tune_learning_rate: float = option(1e-5, "Learning rate of the fine-tuning phase.")


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
    data_service: str | None = option(
        None, "grpc://HOST:PORT of a tf.data service dispatcher: the training stream (and "
              "validation) is produced by its workers (python -m pneumo_data.service).")
