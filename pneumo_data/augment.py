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

Three back ends that give the same result (to float rounding):

* ``"fused"`` (the default): for dense batches of one channel, uint8 (what the stream
  delivers) or float32, the warp and every intensity transform in two XLA-compiled
  functions (:func:`fused_augment`): the first computes each output pixel's source index
  (a vectorized loop of its own; fused into the gather, XLA emits it scalar), the second
  gathers the four neighbours and runs, per pixel, the bilinear weights and gamma, then
  the blur (a loop over the images that drew one, in place), then contrast, brightness,
  the noise and the clip in one more pass. Other inputs (other dtypes, several channels,
  ragged, sizes unknown when traced) take the ``"kernel"`` path.
* ``"kernel"`` uses ``ImageProjectiveTransformV3`` (it has no XLA kernel).
* ``"gather"`` computes the bilinear sample with four gathers, which XLA compiles, so a
  ``jit_compile=True`` train step can keep the augmentation inside.

The noise is one definition for all back ends (:func:`noise_field`): each image's rows are
distinct rows of a small bank of standard normals drawn per batch, with random signs, so
every image's noise is exactly i.i.d. Gaussian while the batch draws about a fifth of the
normals a field per image would cost.

The code: the draws and the matrix in :mod:`pneumo_data.augment_draws`, the intensity
transforms and the noise in :mod:`pneumo_data.augment_intensity`, the fused back end in
:mod:`pneumo_data.augment_fused`; this module holds the warp of the other back ends, the
functions that pick a back end, and the layer.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf
from keras_cv.layers import VectorizedBaseImageAugmentationLayer

from pneumo_data.augment_draws import (
    N_AFFINE,
    N_DRAWS,
    N_INTENSITY,
    NOISE_SEEDS,
    compose,
    sample_draws,
    sample_transforms,
    transforms_from_draws,
)
from pneumo_data.augment_fused import fusable, fused_augment, warp_uint8
from pneumo_data.augment_intensity import apply_intensity, noise_field, noise_parts
from pneumo_data.config import AugmentConfig

__all__ = [
    "BACKENDS", "N_AFFINE", "N_DRAWS", "N_INTENSITY", "NOISE_SEEDS", "RandomAffine",
    "apply_intensity", "augment_batch", "augment_float", "compose", "fusable", "fused_augment",
    "noise_field", "noise_parts", "sample_draws", "sample_transforms", "transforms_from_draws",
    "warp", "warp_uint8",
]

BACKENDS = ("fused", "kernel", "gather")


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


def augment_float(images: tf.Tensor, draws: tf.Tensor, params: AugmentConfig,
                  backend: str = "kernel") -> tf.Tensor:
    """The whole augmentation of images [B, H, W, C] (0..255) for ``draws`` [B, 13]: the
    warp, then the intensity transforms (each skipped when off); float32.

    ``backend="fused"`` takes :func:`fused_augment` when the batch is :func:`fusable`
    (uint8 or float32, one channel) and the ``"kernel"`` path otherwise.
    """
    if backend == "fused":
        if fusable(images):
            return fused_augment(images, draws, params)
        backend = "kernel"
    images = tf.cast(images, tf.float32)
    if not params.affine_is_identity:
        shape = tf.shape(images)
        images = warp(images, transforms_from_draws(draws, shape[1], shape[2]), backend)
    return apply_intensity(images, draws, params, backend)


def augment_batch(images: tf.Tensor, params: AugmentConfig, seed,
                  backend: str = "fused") -> tf.Tensor:
    """Host-side augmentation of a uint8 batch [B, H, W, C]; returns uint8.

    The same warp and intensity transforms as :class:`RandomAffine`, rounded to uint8.
    ``seed`` is a [2] int tensor (stateless). The identity parameters return the input
    unchanged.
    """
    if params.is_identity:
        return images
    draws = sample_draws(tf.shape(images)[0], params, seed)
    if backend == "fused" and fusable(images):
        return fused_augment(images, draws, params, to_uint8=True)
    out = augment_float(images, draws, params, "kernel" if backend == "fused" else backend)
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
      backend: ``"fused"`` (the default: uint8 batches in one XLA-compiled pass, other
        inputs as ``"kernel"``), ``"kernel"`` (ImageProjectiveTransformV3) or
        ``"gather"`` (XLA-compilable).
      seed: optional int for reproducible draws.

    Input shape: ``[B, H, W, C]`` (any real dtype; uint8 is fine), or a ragged
    batch ``[B, None, None, C]`` of differently sized images.
    Output shape: the input's, float32, in the input's value range (0..255 for
    uint8 input; the intensity transforms assume it and clip to it).
    """

    def __init__(self, rotation_deg=15.0, width_shift=0.1, height_shift=0.1, shear_deg=0.1,
                 zoom=0.1, horizontal_flip=True, gamma=0.0, contrast=0.0, brightness_levels=0.0,
                 blur_sigma=0.0, blur_probability=0.0, noise_levels=0.0, backend="fused",
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
        if active and self.backend == "fused" and fusable(inputs):
            # the stream's uint8 batch (or a float32 one), augmented in the compiled passes
            draws = self.get_random_transformation_batch(tf.shape(inputs)[0])
            return fused_augment(inputs, draws, self.params)
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
