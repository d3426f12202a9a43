"""Grad-CAM heatmaps for pneumo's models (all three, any precision).

The last convolutional layer is found by itself: the last layer with a 4-D
output, looking inside a nested backbone (``block5_conv3`` for VGG16,
``conv5_block3_out`` for ResNet50, ``conv2`` for the manual CNN), or the batch norm and
activation right after the last convolution (``block4_relu`` for bn_cnn). When the
model's preprocessing crops a border, the map covers the cropped window and the
border gets 0. The model is
run layer by layer so the feature map of a nested backbone is reachable; the
augmentation layer is inactive (inference), and gradients are taken in float32
even under mixed precision.

Heatmap = ReLU(sum_k mean_ij(dP/dA_k) * A_k), upsampled to the input size and
scaled to [0, 1] per image (an all-zero map stays zero).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from pneumo_models.layers import Preprocess, crop_margin

_POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
            keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
            keras.layers.ZeroPadding2D, keras.layers.InputLayer)
_CONV_TAIL = (keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation)


def _feature_layers(layers) -> list:
    """Layers with a 4-D output that are not pooling, padding or input layers."""
    out = []
    for layer in layers:
        if isinstance(layer, _POOLING) or isinstance(layer, keras.Model):
            continue
        try:
            rank = len(layer.output.shape)
        except (AttributeError, ValueError):
            continue
        if rank == 4 and (layer.weights or not isinstance(layer, keras.layers.Dropout)):
            out.append(layer)
    return out


def last_conv_layer(model: keras.Model) -> tuple[keras.Model | None, str]:
    """(nested backbone or None, name of the last feature-map layer before the head)."""
    found: tuple[keras.Model | None, str] | None = None
    after_conv = False  # a conv's own batch norm and activation belong to its output
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner = _feature_layers(layer.layers)
            if inner:
                found = (layer, inner[-1].name)
            after_conv = False
        elif isinstance(layer, keras.layers.Conv2D):
            found, after_conv = (None, layer.name), True
        elif after_conv and isinstance(layer, _CONV_TAIL):
            found = (None, layer.name)
        else:
            after_conv = False
    if found is None:
        raise ValueError(f"{model.name} has no convolutional layer for Grad-CAM")
    return found


def grad_cam(model: keras.Model, images, layer_name: str | None = None,
             backbone=None) -> np.ndarray:
    """Heatmaps [B, H, W] in [0, 1] for uint8 images [B, H, W, 1]."""
    images = tf.convert_to_tensor(images)
    if layer_name is None:
        backbone, layer_name = last_conv_layer(model)
    if backbone is None:
        forward = _gradcam_flat(model, layer_name)
        with tf.GradientTape() as tape:
            feature, prob = forward(images, tape)
            target = tf.reduce_sum(prob)
        if feature is None:
            raise ValueError(f"{model.name} has no top-level layer {layer_name!r}; for a layer "
                             f"inside a backbone pass backbone= as well")
        grads = tape.gradient(target, feature)
    else:
        to_feature = keras.Model(backbone.inputs, backbone.get_layer(layer_name).output)
        head = list(model.layers[1:])
        index = head.index(backbone)
        with tf.GradientTape() as tape:
            x = images
            for layer in head[:index]:
                x = layer(x, training=False)
            feature = to_feature(x, training=False)
            feature = tf.cast(feature, tf.float32)
            tape.watch(feature)
            # The backbone's remaining layers after `layer_name`, applied to the map.
            y = _backbone_tail(backbone, layer_name, feature)
            for layer in head[index + 1:]:
                y = layer(y, training=False)
            target = tf.reduce_sum(tf.cast(y, tf.float32))
        grads = tape.gradient(target, feature)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * feature, axis=-1, keepdims=True))
    height, width = int(images.shape[1]), int(images.shape[2])
    mh, mw = _crop_margins(model, height, width)
    cam = tf.image.resize(cam, [height - 2 * mh, width - 2 * mw], method="bilinear")
    cam = tf.pad(cam, [[0, 0], [mh, mh], [mw, mw], [0, 0]])[..., 0]
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    return cam.numpy()


def _crop_margins(model: keras.Model, height: int, width: int) -> tuple[int, int]:
    """The border the model's Preprocess layer cuts off (0, 0 without one)."""
    for layer in model.layers:
        if isinstance(layer, Preprocess) and layer.crop:
            return crop_margin(height, layer.crop), crop_margin(width, layer.crop)
    return 0, 0


def _gradcam_flat(model: keras.Model, layer_name: str):
    def run(images, tape):
        x = images
        feature = None
        for layer in model.layers[1:]:
            x = layer(x, training=False)
            if layer.name == layer_name:
                x = tf.cast(x, tf.float32)
                tape.watch(x)
                feature = x
        return feature, tf.cast(x, tf.float32)
    return run


def _backbone_tail(backbone: keras.Model, layer_name: str, feature):
    """Applies the backbone's layers after ``layer_name`` (a chain, e.g. VGG16's pool).

    For graphs with branches after the layer (ResNet50's last block output is
    the backbone's output itself), nothing follows and the map is returned.
    """
    names = [l.name for l in backbone.layers]
    x = feature
    for layer in backbone.layers[names.index(layer_name) + 1:]:
        inbound = layer._inbound_nodes[0].input_tensors if layer._inbound_nodes else []
        if len(inbound) != 1:
            raise ValueError(f"cannot run {backbone.name} past {layer_name}: "
                             f"{layer.name} has {len(inbound)} inputs")
        x = layer(x, training=False)
    return x
