"""Stage (b) in TensorFlow ops (the pipeline, predict, inside every export): see
:mod:`pneumo_data.preprocess.model_input`."""

from __future__ import annotations

import tensorflow as tf

from pneumo_data.preprocess.model_input import axis_weights


def to_model_input(images, model_size: int):
    """Stage (b): uint8 ``[..., S, S, 1]`` -> uint8 ``[..., M, M, 1]``, in int32 TF ops.

    ``S`` must be static. Shrinking averages boxes, growing interpolates
    bilinearly (see :func:`axis_weights`); the result is rounded once, half to
    even, as ``tf.round`` does. Returns ``images`` itself when S == M.
    """
    images = tf.convert_to_tensor(images)
    stored = images.shape[-2]
    if stored is None or images.shape[-3] != stored or images.shape[-1] != 1:
        raise ValueError(f"to_model_input needs static square [..., S, S, 1] images, "
                         f"got shape {images.shape}")
    if stored == model_size:
        return images
    index, weight, d_axis = axis_weights(stored, model_size)
    denominator = d_axis * d_axis
    if 255 * denominator >= 2 ** 31:
        raise ValueError(f"stage (b) {stored} -> {model_size} would overflow int32")
    x = tf.cast(images[..., 0], tf.int32)                       # [..., S, S]
    index_t = tf.constant(index, tf.int32)
    weight_t = tf.constant(weight, tf.int32)
    x = tf.reduce_sum(tf.gather(x, index_t, axis=-1) * weight_t, axis=-1)            # [..., S, M]
    x = tf.reduce_sum(tf.gather(x, index_t, axis=-2) * weight_t[:, :, None], axis=-2)  # [..., M, M]
    half = denominator // 2
    shifted = x + half
    quotient = tf.math.floordiv(shifted, denominator)
    if denominator % 2 == 0:
        # A tie (exactly .5) lands on remainder 0: go back to the even neighbour.
        tie = tf.logical_and(tf.equal(tf.math.floormod(shifted, denominator), 0),
                             tf.equal(tf.math.floormod(quotient, 2), 1))
        quotient = quotient - tf.cast(tie, tf.int32)
    return tf.cast(tf.clip_by_value(quotient, 0, 255), tf.uint8)[..., None]

