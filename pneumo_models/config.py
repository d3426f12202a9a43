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
