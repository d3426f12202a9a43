"""The models, each taking the pipeline's uint8 [H, W, 1] batches directly.

Inside every model: the fused augmentation (training only, when it runs on the
device), the preprocessing its network expects (:class:`pneumo_models.layers.Preprocess`:
``unit``, ``standardize`` or ``caffe``, after an optional border ``crop``), the network,
and a float32 sigmoid output, so a saved model is self-contained and serves raw images.

* ``bn_cnn`` (the default, issue 10), with ``stem="conv"``: Conv 3x3 stride 2, 24 filters,
  BN, ReLU; then four blocks of Conv 3x3 (32, 64, 128, 256 filters), BN, ReLU, with
  MaxPool 2x2 after the first three; global average pooling, Dropout(0.3), Dense(1,
  sigmoid). "same" padding, no conv bias (batch norm has one). About 396k parameters and
  113M multiply-adds per 150 px image: the manual CNN's compute with 27x fewer parameters.
  Default preprocessing: standardize. ``stem="patch4"`` (issue 20; the default, ``auto``)
  replaces the stem, the first block and its pool by a 4x4 space-to-depth (38 x 38 x 16 at
  150 px) and one 3x3 conv of 32 filters, BN, ReLU (named ``stem``): the rest is the same
  network at the same resolutions; about 84M multiply-adds and 1.9x the float32 training
  images/s on an AVX2 CPU (benchmarks/results/train_step-stems-chest_xray_224.md), the
  same resplit-test and shift-suite quality within seed noise
  (benchmarks/results/generalisation.md).
* ``manual_cnn``: exactly the old architecture: Conv2D(32, 3x3, relu),
  MaxPool 2x2, Conv2D(64, 3x3, relu), MaxPool 2x2, Flatten, Dense(128, relu),
  Dropout(0.5), Dense(1, sigmoid). Default preprocessing: standardize (the seed
  recipe's is ``unit``, x / 255).
* ``vgg16``: frozen VGG16 base without top, Flatten, Dense(128, relu),
  Dropout(0.5), Dense(1, sigmoid); :func:`unfreeze_for_fine_tuning` opens
  ``block5`` for a second phase.
* ``resnet50``: frozen ResNet50 base without top (batch norm kept in inference
  mode), Flatten, Dense(128, relu), Dense(1, sigmoid).

Weights: ``imagenet`` (from the Keras cache; never a silent download),
``none``, ``auto`` (imagenet for the backbones, none for the small CNNs) or a
path: for the backbones a backbone weights file (the ``*_notop.h5`` file or
one saved with ``save_weights``); for the small CNNs a weights file of the
whole model.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pneumo_data.augment import RandomAffine
from pneumo_data.common.errors import UserError
from pneumo_data.config import AugmentConfig
from pneumo_models import optim  # noqa: F401  (registers WarmupCosine for load_model)
from pneumo_models.config import MODELS, SMALL_NETWORKS, NetworkConfig
from pneumo_models.layers import Preprocess, SpaceToDepth
from pneumo_models.precision import dtype_policy
from pneumo_models.recipes import network_zoom

# WeightsUnavailableError is re-exported: callers catch models.WeightsUnavailableError.
from pneumo_models.weights import BACKBONES, WeightsUnavailableError, imagenet_source  # noqa: F401


def imagenet_weights_file(name: str) -> str:
    """Path of the cached ImageNet ``notop`` file, downloading only if reachable (see
    :func:`pneumo_models.weights.imagenet_source`, which the training job also calls before
    it writes anything)."""
    cached, url = imagenet_source(name)
    if cached.exists():
        return str(cached)
    return keras.utils.get_file(cached.name, url, cache_subdir="models")


def default_augmentation(name: str) -> AugmentConfig:
    """The default recipe's augmentation for network ``name`` (zoom 0.25 for bn_cnn, 0.1 for
    the others; intensity transforms on)."""
    return AugmentConfig(zoom=network_zoom(name))


def _augmentation(name: str, augment, backend: str, seed: int | None):
    if augment is None or augment is False:
        return None
    params = default_augmentation(name) if augment is True else augment
    if not isinstance(params, AugmentConfig):
        raise TypeError(f"augment must be a bool or AugmentConfig, got {augment!r}")
    return RandomAffine(**dataclasses.asdict(params), backend=backend, seed=seed, name="augment")


def _bn_cnn(x, dropout: float, stem: str = "conv"):
    """The issue-10 network (see the module docstring); blocks named stem, block1-block4
    (``stem="patch4"``: stem then block2-block4)."""
    layers = keras.layers

    def block(x, filters, name, strides=1):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                          name=f"{name}_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    widths = list(enumerate((32, 64, 128, 256), start=1))
    if stem == "patch4":
        x = SpaceToDepth(4, name="space_to_depth")(x)
        x = block(x, 32, "stem")
        widths = widths[1:]
    else:
        x = block(x, 24, "stem", strides=2)
    for i, filters in widths:
        x = block(x, filters, f"block{i}")
        if i < 4:
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return layers.Dropout(dropout, name="dropout")(x)


def build_model(name: str, *, image_size: int = 150, weights: str = "auto",
                augment: bool | AugmentConfig | None = True, augment_backend: str = "fused",
                precision: str = "float32", dropout: float | None = None,
                preprocessing: str = "auto", crop: float = 0.0, seed: int | None = None,
                stem: str = "auto") -> keras.Model:
    """Builds ``name`` (one of MODELS) for uint8 [image_size, image_size, 1] input.

    Args:
      augment: True (the default recipe's augmentation for this network, see
        :func:`default_augmentation`), an AugmentConfig, or False/None.
      augment_backend: ``fused`` (uint8 batches in one XLA-compiled pass), ``kernel`` or
        ``gather`` (use gather under XLA).
      precision: a Keras dtype policy name (already resolved, not ``auto``).
      dropout: None for the network's default (0.3 bn_cnn, 0.5 manual_cnn and vgg16).
      preprocessing: ``auto`` (standardize for the small CNNs, caffe for the backbones),
        ``unit``, ``standardize`` or ``caffe``.
      crop: fraction of the side cut from each border before the network (inside the model).
      seed: seeds the weight initializers and the augmentation layer (reproducible
        builds and draws).
      stem: bn_cnn's first stage, ``conv`` or ``patch4``; ``auto``: patch4 for bn_cnn (see
        the module docstring).
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {MODELS}")
    if not isinstance(image_size, int) or image_size < 32:
        raise UserError(f"image_size must be an integer >= 32, got {image_size!r}")
    network = NetworkConfig(model=name, dropout=dropout, preprocessing=preprocessing,
                            crop=crop, stem=stem)
    network.validate()
    if name in SMALL_NETWORKS and weights == "imagenet":
        raise UserError(f"{name} has no ImageNet weights; use --weights=none or a file")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    dropout = network.resolved_dropout
    with dtype_policy(precision):
        inputs = keras.Input((image_size, image_size, 1), dtype="uint8", name="image")
        x = inputs
        layer = _augmentation(name, augment, augment_backend, seed)
        if layer is not None:
            x = layer(x)
        x = Preprocess(network.resolved_preprocessing, crop=crop, name="preprocess")(x)
        if name == "bn_cnn":
            x = _bn_cnn(x, dropout, network.resolved_stem)
        elif name == "manual_cnn":
            x = keras.layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
            x = keras.layers.MaxPooling2D(2, name="pool1")(x)
            x = keras.layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
            x = keras.layers.MaxPooling2D(2, name="pool2")(x)
            x = keras.layers.Flatten(name="flatten")(x)
            x = keras.layers.Dense(128, activation="relu", name="fc")(x)
            x = keras.layers.Dropout(dropout, name="dropout")(x)
        else:
            base = _backbone(name, int(x.shape[1]), weights)
            base.trainable = False
            x = base(x, training=False)
            x = keras.layers.Flatten(name="flatten")(x)
            x = keras.layers.Dense(128, activation="relu", name="fc")(x)
            if name == "vgg16":
                x = keras.layers.Dropout(dropout, name="dropout")(x)
        outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32",
                                     name="probability")(x)
        model = keras.Model(inputs, outputs, name=name)
    if name in SMALL_NETWORKS and weights not in ("auto", "none", None):
        model.load_weights(_existing(weights))
    synchronize_batch_norm(model)
    return model


def synchronize_batch_norm(model: keras.Model) -> int:
    """Under a strategy with several replicas (built inside its scope), makes every batch
    norm layer compute its training statistics over the global batch (``synchronized``, an
    all-reduce per layer and step) instead of each replica's share: the replicas then keep
    identical moving statistics, and training matches one device with the same global
    batch. No change on one device. Returns the number of layers switched."""
    if tf.distribute.get_strategy().num_replicas_in_sync <= 1:
        return 0
    switched = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized:
            layer.synchronized = True
            switched += 1
    return switched


def _existing(path: str) -> str:
    if not Path(path).is_file():
        raise UserError(f"weights file {path} does not exist")
    return path


def predictor(model: keras.Model):
    """The model's inference as one traced graph: ``f(uint8 [N, M, M, 1]) -> float64 [N]``.

    Evaluation, ``predict`` and the exports all run the model this way. It matters for
    mixed_bfloat16 models: graph execution (``model.predict``, a SavedModel, the LiteRT
    converter's input) fuses ops that eager calls round to bf16 one by one, and the two differ
    by up to about 2e-3 in probability (float32 models: about 1e-7).
    """
    size = int(model.inputs[0].shape[1])

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.uint8)])
    def call(images):
        return tf.reshape(tf.cast(model(images, training=False), tf.float32), [-1])

    return lambda images: np.asarray(call(images), np.float64)


def load_model(path: str | os.PathLike, **kwargs) -> keras.Model:
    """Loads a model saved by pneumo (``.keras``), its custom layers included.

    Raises UserError when the file is missing or is not a Keras model file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a Keras model file (.keras)")
    return keras.models.load_model(path, **kwargs)


def _backbone(name: str, image_size: int, weights: str) -> keras.Model:
    class_name = BACKBONES[name][0]
    constructor = getattr(keras.applications, class_name)
    if weights in ("auto", "imagenet"):
        source = imagenet_weights_file(name)
    elif weights in ("none", None):
        source = None
    else:
        source = _existing(weights)
    base = constructor(include_top=False, weights=None,
                       input_shape=(image_size, image_size, 3))
    if source is not None:
        base.load_weights(source)
    return base


def backbone(model: keras.Model) -> keras.Model | None:
    """The nested backbone model (vgg16/resnet50), or None for the manual CNN."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    return None


def unfreeze_for_fine_tuning(model: keras.Model, prefix: str = "block5") -> int:
    """Makes the backbone trainable from its first ``prefix`` layer on; returns how many.

    The backbone's other layers stay frozen. Recompile afterwards.
    """
    base = backbone(model)
    if base is None:
        raise ValueError(f"{model.name} has no backbone to fine-tune")
    base.trainable = True
    opened = 0
    for layer in base.layers:
        layer.trainable = layer.name.startswith(prefix)
        opened += layer.trainable and bool(layer.weights)
    if not opened:
        raise ValueError(f"no backbone layer of {model.name} starts with {prefix!r}")
    return opened
