"""Small serializable layers that let a saved model take raw uint8 grayscale images."""

from __future__ import annotations

import keras
from keras import ops

# keras.applications' "caffe" preprocessing (VGG16, ResNet50): BGR order, ImageNet means.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
MODES = ("unit", "caffe")


@keras.saving.register_keras_serializable(package="pneumo")
class Preprocess(keras.layers.Layer):
    """uint8 grayscale [B,H,W,1] to what the network expects, in the compute dtype.

    Args:
      mode: ``unit``: x / 255 with one channel (the manual CNN, as the old recipe's
        ``rescale=1/255``); ``caffe``: three channels, BGR, ImageNet means
        subtracted, exactly ``keras.applications.vgg16/resnet50.preprocess_input``
        on a gray image copied to RGB.

    Input shape: ``[B, H, W, 1]``, any real dtype, values 0..255.
    Output shape: ``[B, H, W, 1]`` (unit) or ``[B, H, W, 3]`` (caffe).
    """

    def __init__(self, mode: str = "unit", **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        # Arithmetic in float32, then cast: bf16 cannot hold 255 - 123.68 exactly.
        x = ops.cast(inputs, "float32")
        if self.mode == "unit":
            x = x / 255.0
        else:
            x = ops.concatenate([x - m for m in CAFFE_MEAN_BGR], axis=-1)
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1 if self.mode == "unit" else 3)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
