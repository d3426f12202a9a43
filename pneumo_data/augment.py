"""One fused random affine warp per image: the old recipe's augmentation, resampled once.

The old recipe chained ``ImageDataGenerator(rotation_range=15, width_shift_range=0.1,
height_shift_range=0.1, shear_range=0.1, zoom_range=0.1, horizontal_flip=True,
fill_mode="nearest")``. Chaining five layers resamples the image five times and
costs about five times as much; here every image draws its own rotation, shear,
zoom, shift and flip, the five matrices are composed into one, and the image is
resampled once (bilinear, nearest-edge fill, as ImageDataGenerator did).

Units are explicit (see docs/pipeline.md for the ImageDataGenerator / keras-cv /
Keras mapping); the ranges live in :class:`pneumo_data.config.AugmentConfig`:

================= =========================================================
parameter         meaning
================= =========================================================
rotation_deg      rotation drawn from U(-r, r), in degrees
shear_deg         shear angle drawn from U(-s, s), in degrees; ImageDataGenerator's
                  ``shear_range`` is also degrees, so its 0.1 is 0.1 degree
width_shift       horizontal shift from U(-w, w), as a fraction of the width
height_shift      vertical shift from U(-h, h), as a fraction of the height
zoom              x and y scale factors drawn independently from U(1-z, 1+z)
                  (sampling scale: >1 shows more of the image, as in
                  ImageDataGenerator)
horizontal_flip   mirror left-right with probability 1/2
================= =========================================================

Intensity transforms (issue 10) follow the warp in the same layer, on the warped
float image, each drawn per image (grey levels on the 0..255 scale):

================== ========================================================
parameter          meaning
================== ========================================================
gamma              g log-uniform in [1/(1+G), 1+G]; x -> 255 (x/255)^g
contrast           c log-uniform in [1/(1+C), 1+C]; x -> m + c (x - m),
                   m the image's mean grey level (after gamma)
brightness_levels  offset from U(-b, b) grey levels, added after contrast
blur_sigma         with probability ``blur_probability``, a Gaussian blur
                   whose sigma is drawn from U(0, s) x the shorter side
noise_levels       additive Gaussian noise, its std from U(0, n) grey levels
================== ========================================================

The result is clipped to 0..255. Every transform at 0 is skipped, so all at 0 is
exactly the identity (and the warp alone still reproduces ImageDataGenerator).
Gamma, contrast, brightness, noise and the clip are pointwise and fuse with each
other; the blur is one separable depthwise convolution per axis with a kernel per
image.

Two places to run it:

* :class:`RandomAffine`, a Keras layer (on keras-cv's
  ``VectorizedBaseImageAugmentationLayer``) active only when ``training=True``:
  put it first in the model and it runs where the model runs (the GPU). It
  takes dense batches and ragged batches of differently sized images.
* :func:`augment_batch`, a plain function on a uint8 batch, mapped in tf.data
  (host mode), with stateless per-batch seeds so a seeded pipeline is
  reproducible.

Two resampling back ends that give the same result: ``"kernel"`` uses
``ImageProjectiveTransformV3`` (fast, but it has no XLA kernel) and
``"gather"`` computes the bilinear sample with gathers, which XLA compiles, so
a ``jit_compile=True`` train step can keep the augmentation inside.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf
from keras_cv.layers import VectorizedBaseImageAugmentationLayer

from pneumo_data.config import AugmentConfig

BACKENDS = ("kernel", "gather")
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


def warp(images: tf.Tensor, transforms: tf.Tensor, backend: str = "kernel") -> tf.Tensor:
    """Resamples float images [B, H, W, C] once: bilinear, nearest-edge fill."""
    if backend == "kernel":
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=transforms,
            output_shape=tf.shape(images)[1:3], fill_value=tf.constant(0.0, images.dtype),
            interpolation="BILINEAR", fill_mode="NEAREST")
    if backend == "gather":
        return _warp_gather(images, transforms)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _warp_gather(images: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
    """The same bilinear warp with gathers only (XLA-compilable, GPU-friendly)."""
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    dtype = images.dtype
    ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32),
                         indexing="ij")
    xs, ys = xs[None], ys[None]
    t = tf.cast(transforms, tf.float32)[:, :, None, None]
    k = t[:, 6] * xs + t[:, 7] * ys + 1.0
    in_x = (t[:, 0] * xs + t[:, 1] * ys + t[:, 2]) / k
    in_y = (t[:, 3] * xs + t[:, 4] * ys + t[:, 5]) / k
    w_max = tf.cast(width - 1, tf.float32)
    h_max = tf.cast(height - 1, tf.float32)
    # Nearest fill: coordinates outside the image are clamped to the edge first.
    in_x = tf.clip_by_value(in_x, 0.0, w_max)
    in_y = tf.clip_by_value(in_y, 0.0, h_max)
    x0, y0 = tf.floor(in_x), tf.floor(in_y)
    fx, fy = in_x - x0, in_y - y0
    x1, y1 = tf.minimum(x0 + 1.0, w_max), tf.minimum(y0 + 1.0, h_max)
    flat = tf.reshape(images, [batch, height * width, -1])

    def gather(xi, yi):
        index = tf.cast(yi, tf.int32) * width + tf.cast(xi, tf.int32)
        return tf.gather(flat, tf.reshape(index, [batch, -1]), batch_dims=1)

    fx = tf.reshape(fx, [batch, -1, 1])
    fy = tf.reshape(fy, [batch, -1, 1])
    top = gather(x0, y0) * (1 - fx) + gather(x1, y0) * fx
    bottom = gather(x0, y1) * (1 - fx) + gather(x1, y1) * fx
    out = top * (1 - fy) + bottom * fy
    return tf.cast(tf.reshape(out, shape), dtype)


def _blur(images: tf.Tensor, sigma: tf.Tensor, max_sigma: float) -> tf.Tensor:
    """Separable Gaussian blur of float images [B, H, W, C], one sigma (fraction of the
    shorter side) per image [B]; sigma 0 leaves an image exactly as it was. Edges mirror."""
    shape = tf.shape(images)
    static = images.shape
    if static[1] is not None and static[2] is not None:
        side = min(int(static[1]), int(static[2]))
        radius = max(1, int(math.ceil(3 * max_sigma * side)))
        side = tf.constant(float(side))
    else:
        side = tf.cast(tf.minimum(shape[1], shape[2]), tf.float32)
        radius = tf.maximum(1, tf.cast(tf.math.ceil(3 * max_sigma * side), tf.int32))
    taps = tf.cast(tf.range(-radius, radius + 1), tf.float32)                 # [K]
    # A sigma of 0 becomes 1e-3 px: its kernel is exactly [0, ..., 1, ..., 0] in float32.
    pixels = tf.maximum(sigma * side, 1e-3)[:, None]                           # [B, 1]
    kernel = tf.exp(-0.5 * tf.square(taps[None] / pixels))
    kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)             # [B, K]
    channels = shape[3]
    kernel = tf.repeat(kernel, channels, axis=0)                               # [B*C, K]
    # The batch's images as the channels of one image: [1, H, W, B*C], a depthwise
    # convolution per axis with each image's own kernel.
    x = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, shape[1], shape[2], -1])
    x = tf.pad(x, [[0, 0], [radius, radius], [0, 0], [0, 0]], mode="SYMMETRIC")
    x = tf.nn.depthwise_conv2d(x, tf.transpose(kernel)[:, None, :, None], [1, 1, 1, 1], "VALID")
    x = tf.pad(x, [[0, 0], [0, 0], [radius, radius], [0, 0]], mode="SYMMETRIC")
    x = tf.nn.depthwise_conv2d(x, tf.transpose(kernel)[None, :, :, None], [1, 1, 1, 1], "VALID")
    x = tf.reshape(x, [shape[1], shape[2], shape[0], channels])
    return tf.transpose(x, [2, 0, 1, 3])


def _gaussian(shape, seed) -> tf.Tensor:
    """Standard normal noise of ``shape`` by Box-Muller from one stateless uniform draw (two
    normals per pair of uniforms): on CPU about twice as fast as ``stateless_normal``."""
    n = tf.reduce_prod(shape)
    half = (n + 1) // 2
    u = tf.random.stateless_uniform(tf.stack([2, half]), seed, minval=1e-7, maxval=1.0)
    radius = tf.sqrt(-2.0 * tf.math.log(u[0]))
    angle = (2.0 * math.pi) * u[1]
    z = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)[:n]
    return tf.reshape(z, shape)


def apply_intensity(images: tf.Tensor, draws: tf.Tensor, params: AugmentConfig) -> tf.Tensor:
    """The intensity transforms of ``draws`` [B, 13] on float images [B, H, W, C] (0..255).

    Transforms that ``params`` turns off are skipped (not computed as identities), so all
    off returns ``images`` itself.
    """
    if params.intensity_is_identity:
        return images
    gamma, contrast, brightness, sigma, noise, noise_seed = tf.unstack(
        draws[:, N_AFFINE:], axis=1)

    def per_image(v):
        return v[:, None, None, None]

    x = images
    if params.gamma:
        # (x/255)^g as exp(g log(x/255)): 3x faster than tf.pow with a per-image exponent
        # (which takes Eigen's slow broadcasting path); log(0) = -inf gives exactly 0.
        x = 255.0 * tf.exp(per_image(gamma) * tf.math.log(tf.clip_by_value(x, 0.0, 255.0)
                                                           / 255.0))
    if params.contrast:
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = mean + per_image(contrast) * (x - mean)
    if params.brightness_levels:
        x = x + per_image(brightness)
    if params.blurs:
        x = _blur(x, sigma, params.blur_sigma)
    if params.noise_levels:
        seed = tf.cast(tf.stack([noise_seed[0], noise_seed[-1]]), tf.int64)
        x = x + per_image(noise) * _gaussian(tf.shape(x), seed)
    return tf.clip_by_value(x, 0.0, 255.0)


def augment_float(images: tf.Tensor, draws: tf.Tensor, params: AugmentConfig,
                  backend: str = "kernel") -> tf.Tensor:
    """The whole augmentation of float images [B, H, W, C] for ``draws`` [B, 13]: the warp,
    then the intensity transforms (each skipped when off)."""
    if not params.affine_is_identity:
        shape = tf.shape(images)
        images = warp(images, transforms_from_draws(draws, shape[1], shape[2]), backend)
    return apply_intensity(images, draws, params)


def augment_batch(images: tf.Tensor, params: AugmentConfig, seed,
                  backend: str = "kernel") -> tf.Tensor:
    """Host-side augmentation of a uint8 batch [B, H, W, C]; returns uint8.

    The same warp and intensity transforms as :class:`RandomAffine`, rounded to uint8.
    ``seed`` is a [2] int tensor (stateless). The identity parameters return the input
    unchanged.
    """
    if params.is_identity:
        return images
    draws = sample_draws(tf.shape(images)[0], params, seed)
    out = augment_float(tf.cast(images, tf.float32), draws, params, backend)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def _per_replica(seed):
    """``seed`` folded with the replica's id when several replicas train (tf.distribute):
    the seed generator's state is mirrored, so without this every replica would draw the
    same transforms for its share of the batch. One replica keeps ``seed`` unchanged."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return seed
    replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), replica)


@keras.saving.register_keras_serializable(package="pneumo")
class RandomAffine(VectorizedBaseImageAugmentationLayer):
    """The fused augmentation as a Keras layer, active only in training: one affine warp
    per image, then the intensity transforms (see the module docstring), in one layer.

    Built on keras-cv's ``VectorizedBaseImageAugmentationLayer`` for its batched
    input handling (dicts, ragged batches, labels passed through); the random
    draw is this module's own stateless sampler (shared with host mode), fed by a
    Keras ``SeedGenerator`` whose state is a variable of the layer: a seeded layer
    gives the same draws in every run, and a saved model resumes the sequence
    where it stopped. keras-cv's base layer always augments (it has no
    ``training`` switch; this layer adds one) and ignores a seed of 0 (this one
    does not).

    Args:
      rotation_deg, width_shift, height_shift, shear_deg, zoom, horizontal_flip:
        see :class:`pneumo_data.config.AugmentConfig` (defaults: the old
        ImageDataGenerator call).
      gamma, contrast, brightness_levels, blur_sigma, blur_probability, noise_levels:
        the intensity transforms, see :class:`pneumo_data.config.AugmentConfig`. They
        default to 0 (off) here, so a layer saved before they existed loads unchanged;
        ``AugmentConfig()`` (the training job's default) turns them on.
      backend: ``"kernel"`` (ImageProjectiveTransformV3) or ``"gather"``
        (XLA-compilable).
      seed: optional int for reproducible draws.

    Input shape: ``[B, H, W, C]`` (any real dtype; uint8 is fine), or a ragged
    batch ``[B, None, None, C]`` of differently sized images.
    Output shape: the input's, float32, in the input's value range (0..255 for
    uint8 input; the intensity transforms assume it and clip to it).
    """

    def __init__(self, rotation_deg=15.0, width_shift=0.1, height_shift=0.1, shear_deg=0.1,
                 zoom=0.1, horizontal_flip=True, gamma=0.0, contrast=0.0, brightness_levels=0.0,
                 blur_sigma=0.0, blur_probability=0.0, noise_levels=0.0, backend="kernel",
                 seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")  # warp in float32 even under mixed precision
        # The base layer's own tf.random.Generator is unused (draws come from the Keras
        # SeedGenerator below); a fixed seed keeps it off the global generator, which TF
        # refuses to create under op determinism.
        super().__init__(seed=1, **kwargs)
        self.params = AugmentConfig(
            rotation_deg, width_shift, height_shift, shear_deg, zoom, horizontal_flip,
            gamma=gamma, contrast=contrast, brightness_levels=brightness_levels,
            blur_sigma=blur_sigma, blur_probability=blur_probability, noise_levels=noise_levels)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="augment_seed")

    @classmethod
    def from_params(cls, params: AugmentConfig, **kwargs) -> "RandomAffine":
        """The layer for an :class:`AugmentConfig` (``backend``, ``seed``, ``name`` as kwargs)."""
        return cls(**dataclasses.asdict(params), **kwargs)

    def get_random_transformation_batch(self, batch_size, images=None, **kwargs):
        # Draws only: the matrix depends on each image's size, which a ragged batch
        # knows per image (augment_ragged_image), a dense one per batch.
        return sample_draws(batch_size, self.params, _per_replica(self.seed_generator.next()))

    def augment_images(self, images, transformations, **kwargs):
        return augment_float(images, transformations, self.params, self.backend)

    def augment_labels(self, labels, transformations, **kwargs):
        return labels

    def augment_ragged_image(self, image, transformation, **kwargs):
        image = tf.cast(image, self.compute_dtype)
        return self.augment_images(image[None], transformation[None])[0]

    def call(self, inputs, training=None):
        active = training and not self.params.is_identity
        if isinstance(inputs, dict):  # keras-cv's {"images": ..., "labels": ...} form
            return super().call(inputs) if active else inputs
        if not isinstance(inputs, tf.RaggedTensor):
            inputs = tf.convert_to_tensor(inputs)
        inputs = tf.cast(inputs, self.compute_dtype)
        return super().call(inputs) if active else inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    # Keras saves a layer's own variables but not its seed generators' state; store it
    # too, so a saved model (a resume checkpoint) continues the draws where they stopped.
    def save_own_variables(self, store):
        super().save_own_variables(store)
        store["seed_state"] = self.seed_generator.state.numpy()

    def load_own_variables(self, store):
        if "seed_state" in store:
            self.seed_generator.state.assign(store["seed_state"][...])
        super().load_own_variables({k: store[k] for k in store.keys() if k != "seed_state"})

    def get_config(self):
        config = super().get_config()
        config.update(dataclasses.asdict(self.params), backend=self.backend, seed=self.seed)
        return config
