"""The fused back end of the augmentation: the warp and every intensity transform of a dense
one-channel batch (uint8 or float32) in two XLA-compiled functions (:func:`fused_augment`).

The first computes each output pixel's source index; the second gathers the four neighbours
and runs, per pixel, the bilinear weights and gamma, then the blur (a loop over the images
that drew one, in place), then contrast, brightness, the noise and the clip. The sample
points, weights and noise are those of the other back ends (:mod:`pneumo_data.augment`).
"""

from __future__ import annotations

import math

import tensorflow as tf

from pneumo_data.augment_draws import N_AFFINE, transforms_from_draws
from pneumo_data.augment_intensity import _blur_kernel, _noise_seed, noise_from_parts, noise_parts
from pneumo_data.config import AugmentConfig


def _source_coords(transforms: tf.Tensor, ramps, height: int, width: int):
    """The source point (in_x, in_y) [B, H, W] of every output pixel for affine ``transforms``
    [B, 8], clamped to the image (nearest fill), as ``ImageProjectiveTransformV3`` computes it.
    ``ramps`` are the output pixels' x and y coordinates, float32 [W] and [H]
    (:func:`_ramps`)."""
    t = tf.cast(transforms, tf.float32)

    def row(i):
        return t[:, i][:, None, None]

    xs, ys = ramps[0][None, None, :], ramps[1][None, :, None]
    in_x = tf.clip_by_value(row(0) * xs + (row(1) * ys + row(2)), 0.0, width - 1.0)
    in_y = tf.clip_by_value(row(3) * xs + (row(4) * ys + row(5)), 0.0, height - 1.0)
    return in_x, in_y


def _ramps(height: int, width: int):
    """0, 1, ..., W - 1 and 0, ..., H - 1 as float32 tensors. They enter the compiled functions
    as arguments: built inside, XLA makes them an iota and converts its 64-bit loop counter to
    float for every pixel, which AVX2 has no instruction for (the index loop takes 2x as long)."""
    return (tf.range(width, dtype=tf.float32), tf.range(height, dtype=tf.float32))


def _source_index(transforms: tf.Tensor, ramps, batch: int, height: int,
                  width: int) -> tf.Tensor:
    """int32 [B, H, W]: the flat index (into the batch's pixels) of each output pixel's upper
    left source neighbour."""
    in_x, in_y = _source_coords(transforms, ramps, height, width)
    x0 = tf.cast(in_x, tf.int32)  # the floor: in_x >= 0
    y0 = tf.cast(in_y, tf.int32)
    return (tf.range(batch)[:, None, None] * height + y0) * width + x0


# A compiled function of its own: inside the sampling function XLA fuses the index arithmetic
# into the gather's loop, which it then cannot vectorize (about 2x slower on the CPU).
_source_index_xla = tf.function(_source_index, jit_compile=True)


def _sample(images: tf.Tensor, index: tf.Tensor, transforms: tf.Tensor, ramps) -> tf.Tensor:
    """The bilinear samples float32 [B, H, W] of uint8 or float32 images [B, H, W] at the
    source points of ``transforms``, the upper left neighbours given by ``index``
    (:func:`_source_index`).

    The four neighbours are four gathers (of bytes, for uint8) from the flat batch; a right
    or lower neighbour past the image's edge only occurs with weight 0 (the point is clamped
    onto the edge), so whatever it reads (the next row; past the batch's end, its last pixel)
    leaves the sample exactly the edge pixel, as nearest fill has it. The weights come from
    the point recomputed here against the neighbour ``index`` names (not a second floor,
    which XLA might round differently)."""
    batch, height, width = (int(d) for d in images.shape)
    flat = tf.reshape(images, [-1])
    last = batch * height * width - 1
    q0, q1, q2, q3 = (tf.cast(tf.gather(flat, tf.minimum(index + d, last)), tf.float32)
                      for d in (0, 1, width, width + 1))
    in_x, in_y = _source_coords(transforms, ramps, height, width)
    x0 = tf.truncatemod(index, width)
    y0 = tf.truncatemod(tf.truncatediv(index, width), height)
    fx = tf.clip_by_value(in_x - tf.cast(x0, tf.float32), 0.0, 1.0)
    fy = tf.clip_by_value(in_y - tf.cast(y0, tf.float32), 0.0, 1.0)
    top = q0 + fx * (q1 - q0)
    bottom = q2 + fx * (q3 - q2)
    return top + fy * (bottom - top)


_sample_xla = tf.function(_sample, jit_compile=True)


def warp_uint8(images: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
    """The fused back end's warp alone: the bilinear, nearest-fill warp of uint8 images
    [B, H, W] (affine ``transforms`` [B, 8], sizes known when traced) in its two compiled
    steps; float32 [B, H, W]. Same sample points and weights as ``ImageProjectiveTransformV3``."""
    batch, height, width = (int(d) for d in images.shape)
    ramps = _ramps(height, width)
    return _sample_xla(images, _source_index_xla(transforms, ramps, batch, height, width),
                       transforms, ramps)


def _blur_one(image: tf.Tensor, taps: tf.Tensor) -> tf.Tensor:
    """One float image [H, W] blurred by the separable kernel ``taps`` [2r + 1] along both
    axes, edges mirrored (as :func:`_blur`): a sum of 2r + 1 shifted copies per axis."""
    radius = (int(taps.shape[0]) - 1) // 2

    def along(x, axis):
        paddings = [[0, 0], [0, 0]]
        paddings[axis] = [radius, radius]
        padded = tf.pad(x, paddings, mode="SYMMETRIC")
        n = int(x.shape[axis])
        parts = [taps[i] * (padded[i:i + n] if axis == 0 else padded[:, i:i + n])
                 for i in range(2 * radius + 1)]
        return tf.add_n(parts)

    return along(along(image, 0), 1)


def _blur_loop(x: tf.Tensor, sigma: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """:func:`_blur` of float images [B, H, W] (taps [B, 2r + 1] of :func:`_blur_kernel`) on
    the images that drew a blur only (``sigma`` > 0), one image per step of a loop that
    updates the batch in place: the work follows the number of blurred images, and the
    others pass exactly as they were (as a sigma of 0 leaves them)."""
    drawn = tf.cast(sigma > 0, tf.int32)
    count = tf.reduce_sum(drawn)
    order = tf.argsort(drawn, direction="DESCENDING", stable=True)

    def step(j, images):
        b = tf.gather(order, j)
        blurred = _blur_one(tf.gather(images, b), tf.gather(kernel, b))
        return j + 1, tf.tensor_scatter_nd_update(images, b[None, None], blurred[None])

    return tf.while_loop(lambda j, _: j < count, step, (tf.constant(0), x))[1]


@tf.function(jit_compile=True)
def _fused_xla(images, index, transforms, ramps, draws, blur_kernel, bank, rows, signs, params,
               to_uint8):
    # Per-image quantities (the matrices, the blur taps) come in computed: left inside, XLA
    # fuses their cos/sin/exp into the per-pixel loop and recomputes them for every pixel.
    x = images[..., 0]
    x = (tf.cast(x, tf.float32) if params.affine_is_identity
         else _sample(x, index, transforms, ramps))
    gamma, contrast, brightness, sigma, noise_std, _ = tf.unstack(draws[:, N_AFFINE:], axis=1)

    def per_image(v):
        return v[:, None, None]

    if params.gamma:  # as in _intensity
        x = tf.exp(per_image(gamma) * tf.math.log(tf.maximum(x, 0.0))
                   + per_image((1.0 - gamma) * math.log(255.0)))
    # Contrast and brightness, c x + (b + (1 - c) m), come after the blur here: the blur's
    # taps sum to 1 and are symmetric, and its edges mirror, so it commutes with them and
    # keeps each image's mean m (of the image after gamma) to float rounding; the pixels then
    # pass once, and the loop updates the batch in place (no copy kept for the mean).
    if params.blurs:
        x = _blur_loop(x, sigma, blur_kernel)
    scale = per_image(contrast) if params.contrast else 1.0
    offset = per_image(brightness) if params.brightness_levels else 0.0
    if params.contrast:
        mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        offset = offset + (1.0 - scale) * mean
    if params.contrast or params.brightness_levels:
        x = scale * x + offset
    if params.noise_levels:
        x = x + per_image(noise_std) * noise_from_parts((bank, rows, signs), tf.shape(x))
    if not params.intensity_is_identity:
        x = tf.clip_by_value(x, 0.0, 255.0)
    x = x[..., None]
    if to_uint8:
        return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
    return x


def fusable(images) -> bool:
    """True when :func:`fused_augment` takes ``images``: a dense uint8 or float32
    [B, H, W, 1] tensor whose size is known when traced."""
    return (isinstance(images, tf.Tensor) and images.dtype in (tf.uint8, tf.float32)
            and images.shape.rank == 4 and images.shape[-1] == 1
            and all(d is not None for d in images.shape))


def fused_augment(images: tf.Tensor, draws: tf.Tensor, params: AugmentConfig,
                  to_uint8: bool = False) -> tf.Tensor:
    """The whole augmentation of a uint8 (or float32, 0..255) batch [B, H, W, 1] for
    ``draws`` [B, 13] in two XLA-compiled functions: float32 0..255, or uint8 rounded with
    ``to_uint8``.

    The noise's random parts are drawn outside the compiled functions (the same numbers as
    every other back end; XLA's stateless random ops are slow on CPU).
    """
    if not fusable(images):
        raise ValueError(f"fused_augment takes dense uint8 or float32 [B, H, W, 1] batches "
                         f"of known size, got {images.dtype.name} {images.shape}")
    draws = tf.cast(draws, tf.float32)
    height, width = int(images.shape[1]), int(images.shape[2])
    if params.noise_levels:
        bank, index_rows, signs = noise_parts(tf.shape(images),
                                              _noise_seed(draws[:, N_AFFINE + 5]))
    else:
        bank = index_rows = signs = tf.zeros([0])
    blur_kernel = (_blur_kernel(draws[:, N_AFFINE + 3], min(height, width), params.blur_sigma)
                   if params.blurs else tf.zeros([tf.shape(draws)[0], 1]))
    transforms = transforms_from_draws(draws, height, width)
    ramps = _ramps(height, width)
    index = (tf.zeros([0], tf.int32) if params.affine_is_identity
             else _source_index_xla(transforms, ramps, int(images.shape[0]), height, width))
    return _fused_xla(images, index, transforms, ramps, draws, blur_kernel, bank, index_rows,
                      signs, params, bool(to_uint8))
