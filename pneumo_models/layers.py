"""Small serializable layers that let a saved model take raw uint8 grayscale images."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

# keras.applications' "caffe" preprocessing (VGG16, ResNet50): BGR order, ImageNet means.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
MODES = ("unit", "standardize", "caffe")
MIN_STD = 1.0  # grey levels: a flat image is divided by 1, not by ~0


def crop_margin(size: int, crop: float) -> int:
    """Pixels cut from each border of a ``size`` px side for a ``crop`` fraction."""
    return int(round(crop * size))


@keras.saving.register_keras_serializable(package="pneumo")
class Preprocess(keras.layers.Layer):
    """uint8 grayscale [B,H,W,1] to what the network expects, in the compute dtype.

    Part of the model, so training, evaluation, the served SavedModel and the LiteRT
    flatbuffers all compute it the same way.

    Args:
      mode: ``unit``: x / 255 with one channel (the manual CNN of the seed recipe, as the
        old recipe's ``rescale=1/255``); ``standardize``: per image (x - mean) / max(std, 1
        grey level), one channel, so a change of window, gain or offset moves the input
        less (issue 10); ``caffe``: three channels, BGR, ImageNet means subtracted, exactly
        ``keras.applications.vgg16/resnet50.preprocess_input`` on a gray image copied to RGB.
      crop: fraction of the side cut from each border first (0: none), e.g. 0.05 drops the
        outer 5 % where burned-in labels and collimator edges sit. The network then sees
        ``H - 2 round(crop H)`` px (no resampling); ``standardize`` uses the cropped image's
        statistics.

    Input shape: ``[B, H, W, 1]``, any real dtype, values 0..255.
    Output shape: ``[B, H', W', 1]`` (unit, standardize) or ``[B, H', W', 3]`` (caffe), with
    ``H' = H - 2 round(crop H)``.
    """

    def __init__(self, mode: str = "unit", crop: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= crop < 0.25:
            raise ValueError(f"crop must be in [0, 0.25), got {crop!r}")
        self.mode = mode
        self.crop = float(crop)

    def call(self, inputs):
        # Arithmetic in float32, then cast: bf16 cannot hold 255 - 123.68 exactly.
        x = ops.cast(inputs, "float32")
        if self.crop:
            h, w = inputs.shape[1], inputs.shape[2]
            mh, mw = crop_margin(h, self.crop), crop_margin(w, self.crop)
            x = x[:, mh:h - mh, mw:w - mw, :]
        if self.mode == "unit":
            x = x / 255.0
        elif self.mode == "standardize":
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            centred = x - mean
            std = ops.sqrt(ops.mean(ops.square(centred), axis=(1, 2, 3), keepdims=True))
            x = centred / ops.maximum(std, MIN_STD)
        else:
            x = ops.concatenate([x - m for m in CAFFE_MEAN_BGR], axis=-1)
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1], input_shape[2]
        if self.crop:
            h = None if h is None else h - 2 * crop_margin(h, self.crop)
            w = None if w is None else w - 2 * crop_margin(w, self.crop)
        return (input_shape[0], h, w, 3 if self.mode == "caffe" else 1)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "crop": self.crop}


@keras.saving.register_keras_serializable(package="pneumo")
class SpaceToDepth(keras.layers.Layer):
    """Moves each ``block`` x ``block`` patch of pixels into channels (``tf.nn.space_to_depth``),
    after padding the height and width up to multiples of ``block`` by mirroring the border.

    The ``patch4`` stem of ``bn_cnn`` (issue 20): a 150 px grey image becomes 38 x 38 x 16, and
    the first 3 x 3 convolution then sees 12 x 12 pixels at a quarter of the resolution, instead
    of two convolutions at 75 x 75 (the step's most expensive part on a CPU).

    Input shape: ``[B, H, W, C]``. Output shape: ``[B, ceil(H/b), ceil(W/b), C b^2]``.
    """

    def __init__(self, block: int = 4, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(block, int) or block < 2:
            raise ValueError(f"block must be an integer >= 2, got {block!r}")
        self.block = block

    def call(self, inputs):
        b = self.block
        h, w = inputs.shape[1], inputs.shape[2]
        if h is None or w is None:  # unknown when traced (e.g. a distributed dataset's input)
            dynamic = tf.shape(inputs)
            h = dynamic[1] if h is None else h
            w = dynamic[2] if w is None else w
        ph, pw = -h % b, -w % b
        x = tf.pad(inputs, [[0, 0], [ph // 2, ph - ph // 2], [pw // 2, pw - pw // 2], [0, 0]],
                   mode="SYMMETRIC")
        return tf.nn.space_to_depth(x, b)

    def compute_output_shape(self, input_shape):
        b = self.block

        def side(n):
            return None if n is None else -(-n // b)
        channels = None if input_shape[3] is None else input_shape[3] * b * b
        return (input_shape[0], side(input_shape[1]), side(input_shape[2]), channels)

    def get_config(self):
        return {**super().get_config(), "block": self.block}
