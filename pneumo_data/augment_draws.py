"""The random draws of the augmentation and the affine matrix they make.

One row of draws per image (:func:`sample_draws`): the affine part (rotation, shear, zoom,
shift, flip) and the intensity part (gamma, contrast, brightness, blur, noise), drawn with
stateless random ops so equal seeds give equal draws in every back end. The affine columns
become one projective matrix per image (:func:`compose`, :func:`transforms_from_draws`), in the
8-number form of ``ImageProjectiveTransformV3``. See :mod:`pneumo_data.augment` for the units.
"""

from __future__ import annotations

import math

import tensorflow as tf

from pneumo_data.config import AugmentConfig

N_AFFINE = 7  # theta, shear, zx, zy, tx (fraction), ty (fraction), flip sign
N_INTENSITY = 6  # gamma, contrast, brightness, blur sigma (fraction), noise std, noise seed
N_DRAWS = N_AFFINE + N_INTENSITY
NOISE_SEEDS = 2 ** 24  # noise seeds are integers below this (exact in float32)


def sample_draws(batch_size, params: AugmentConfig, seed) -> tf.Tensor:
    """The random draws [B, 13] of a batch: one independent draw per image.

    Columns 0-6 (affine): rotation and shear (radians), x and y zoom, x and y shift
    (fractions of width and height), flip sign (+1 or -1). Columns 7-12 (intensity): gamma
    exponent, contrast factor, brightness offset (grey levels), blur sigma (fraction of the
    shorter side; 0: no blur), noise standard deviation (grey levels) and an integer seed of
    the image's noise. A transform that is off draws its identity value. ``seed`` is a
    shape [2] int tensor for the stateless random ops, so equal seeds give equal draws; the
    affine columns are the same draws as before the intensity columns existed.
    """
    seed = tf.cast(seed, tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, num=N_AFFINE)
    more = tf.random.experimental.stateless_split(  # one more: blur on/off
        tf.random.experimental.stateless_fold_in(seed, 1), num=N_INTENSITY + 1)
    shape = tf.reshape(tf.cast(batch_size, tf.int32), [1])

    def uniform(i, low, high, pool=seeds):
        return tf.random.stateless_uniform(shape, pool[i], low, high, dtype=tf.float32)

    def log_uniform(i, spread):
        return tf.exp(uniform(i, -math.log1p(spread), math.log1p(spread), more))

    deg = math.pi / 180.0
    blurred = uniform(3, 0.0, 1.0, more) < params.blur_probability
    columns = [
        uniform(0, -params.rotation_deg * deg, params.rotation_deg * deg),
        uniform(1, -params.shear_deg * deg, params.shear_deg * deg),
        uniform(2, 1 - params.zoom, 1 + params.zoom),
        uniform(3, 1 - params.zoom, 1 + params.zoom),
        uniform(4, -params.width_shift, params.width_shift),
        uniform(5, -params.height_shift, params.height_shift),
        (tf.where(uniform(6, 0.0, 1.0) < 0.5, -1.0, 1.0) if params.horizontal_flip
         else tf.ones(shape, tf.float32)),
        log_uniform(0, params.gamma),
        log_uniform(1, params.contrast),
        uniform(2, -params.brightness_levels, params.brightness_levels, more),
        tf.where(blurred, uniform(4, 0.0, params.blur_sigma, more), 0.0) if params.blurs
        else tf.zeros(shape, tf.float32),
        uniform(5, 0.0, params.noise_levels, more),
        tf.floor(uniform(6, 0.0, float(NOISE_SEEDS), more)),
    ]
    return tf.stack(columns, axis=1)


def transforms_from_draws(draws: tf.Tensor, height, width) -> tf.Tensor:
    """Projective transforms [B, 8] for images of ``height`` x ``width`` from draws [B, >=7]."""
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    theta, shear, zx, zy, fx, fy, flip = tf.unstack(draws[:, :N_AFFINE], axis=1)
    return compose(theta, shear, zx, zy, fx * width, fy * height, flip, height, width)


def sample_transforms(batch_size, height: int, width: int, params: AugmentConfig,
                      seed) -> tf.Tensor:
    """Random projective transforms [B, 8] (output pixel -> input pixel), one per image.

    ``seed`` is a shape [2] int tensor for the stateless random ops.
    """
    return transforms_from_draws(sample_draws(batch_size, params, seed), height, width)


def compose(theta, shear, zx, zy, tx, ty, flip, height, width) -> tf.Tensor:
    """One matrix per image: A = Rotation(theta) Shear(shear) Zoom(zx, zy) Flip, about the centre.

    An output pixel p maps to the input point c + A (p - c) + t, with c the
    image centre and t = (tx, ty) in pixels; returned in the 8-number form of
    ``ImageProjectiveTransformV3``.
    """
    cos, sin = tf.cos(theta), tf.sin(theta)
    # Shear(s) = [[1, -sin s], [0, cos s]]; Zoom = diag(zx, zy); Flip = diag(flip, 1).
    s00, s01, s11 = tf.ones_like(shear), -tf.sin(shear), tf.cos(shear)
    # R @ S
    rs00, rs01 = cos * s00, cos * s01 - sin * s11
    rs10, rs11 = sin * s00, sin * s01 + cos * s11
    a00, a01 = rs00 * zx * flip, rs01 * zy
    a10, a11 = rs10 * zx * flip, rs11 * zy
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    b0 = cx + tx - (a00 * cx + a01 * cy)
    b1 = cy + ty - (a10 * cx + a11 * cy)
    zeros = tf.zeros_like(theta)
    return tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)
