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
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf
from keras_cv.layers import VectorizedBaseImageAugmentationLayer

from pneumo_data.config import AugmentConfig

BACKENDS = ("fused", "kernel", "gather")
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


NOISE_BANK_MIN_ROWS = 512


def noise_parts(shape, seed):
    """The random parts of a batch's noise (see :func:`noise_field`): a bank [R, W*C] of
    standard normals, the bank row of each image row [B, H] and a sign per image row [B, H].

    R is a power of two at least 2H (and at least 512); image b's row y is bank row
    ``(start_b + stride_b * y) mod R`` with an odd stride, so an image never uses a bank
    row twice. ``shape`` is [B, H, W, C]; ``seed`` a [2] int tensor.
    """
    shape = tf.cast(shape, tf.int32)
    b, h, w, c = shape[0], shape[1], shape[2], shape[3]
    exponent = tf.math.ceil(tf.math.log(tf.cast(tf.maximum(2 * h, NOISE_BANK_MIN_ROWS),
                                                tf.float32)) / math.log(2.0) - 1e-6)
    rows = tf.cast(tf.round(tf.pow(2.0, exponent)), tf.int32)
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    bank = _gaussian(tf.stack([rows, w * c]), s[0])
    start_stride = tf.random.stateless_uniform(tf.stack([2, b, 1]), s[1], 0, 1 << 30,
                                               dtype=tf.int32)
    stride = 2 * start_stride[1] + 1
    index = tf.math.floormod(start_stride[0] + stride * tf.range(h)[None], rows)
    signs = tf.where(tf.random.stateless_uniform(tf.stack([b, h]), s[2]) < 0.5, -1.0, 1.0)
    return bank, index, signs


def noise_from_parts(parts, shape) -> tf.Tensor:
    """Standard normal noise [B, H, W, C] from :func:`noise_parts`."""
    bank, index, signs = parts
    rows = tf.gather(bank, index) * signs[:, :, None]  # [B, H, W*C]
    return tf.reshape(rows, shape)


def noise_field(shape, seed) -> tf.Tensor:
    """Standard normal noise of ``shape`` [B, H, W, C] for one batch.

    Within an image every pixel is an independent N(0, 1) draw (its rows are distinct rows
    of a bank of i.i.d. normals, each with a random sign), which is what the noise
    transform needs; images of one batch share bank rows (in other places, other signs),
    so their noise is not independent of each other's. That costs nothing in training (the
    noise is independent of the labels) and draws R x W normals per batch instead of
    B x H x W (about 5x fewer at 150 px, batch 32).
    """
    return noise_from_parts(noise_parts(shape, seed), shape)


def _noise_seed(noise_seed: tf.Tensor) -> tf.Tensor:
    """The batch's noise seed from the draws' per-image noise-seed column."""
    return tf.cast(tf.stack([noise_seed[0], noise_seed[-1]]), tf.int64)


def _blur_subset(images: tf.Tensor, sigma: tf.Tensor, max_sigma: float) -> tf.Tensor:
    """:func:`_blur` on the images whose sigma is above 0 only; the others pass unchanged
    (a sigma of 0 is exactly the identity, so the result is the same, for less work)."""
    chosen = tf.where(sigma > 0)[:, 0]
    blurred = _blur(tf.gather(images, chosen), tf.gather(sigma, chosen), max_sigma)
    return tf.tensor_scatter_nd_update(images, chosen[:, None], blurred)


def _blur_kernel(sigma: tf.Tensor, side: int, max_sigma: float) -> tf.Tensor:
    """Each image's normalized Gaussian taps [B, 2r + 1] (as :func:`_blur`'s)."""
    radius = max(1, int(math.ceil(3 * max_sigma * side)))
    taps = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    pixels = tf.maximum(sigma * float(side), 1e-3)[:, None]
    kernel = tf.exp(-0.5 * tf.square(taps[None] / pixels))
    return kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)


def _shift_blur(images: tf.Tensor, sigma: tf.Tensor, max_sigma: float) -> tf.Tensor:
    """:func:`_blur` as a sum of shifted copies (2r + 1 per axis): one fused loop under XLA.
    ``sigma`` is [B] (fractions of the side) or already the taps [B, 2r + 1] of
    :func:`_blur_kernel`. Falls back to :func:`_blur` when the height or width is unknown
    when traced."""
    if images.shape[1] is None or images.shape[2] is None:
        return _blur(images, sigma, max_sigma)
    height, width = int(images.shape[1]), int(images.shape[2])
    kernel = sigma if sigma.shape.rank == 2 else _blur_kernel(sigma, min(height, width),
                                                               max_sigma)
    radius = (int(kernel.shape[1]) - 1) // 2

    def along(x, axis, n):
        head = tf.reverse(tf.gather(x, tf.range(radius), axis=axis), [axis])
        tail = tf.reverse(tf.gather(x, tf.range(n - radius, n), axis=axis), [axis])
        padded = tf.concat([head, x, tail], axis=axis)
        parts = []
        for i in range(2 * radius + 1):
            piece = padded[:, i:i + n] if axis == 1 else padded[:, :, i:i + n]
            parts.append(kernel[:, i, None, None, None] * piece)
        return tf.add_n(parts)

    return along(along(images, 1, height), 2, width)


def _intensity(x: tf.Tensor, draws: tf.Tensor, params: AugmentConfig, noise, fused: bool):
    """The intensity transforms on float images [B, H, W, C] (0..255) of the "kernel" and
    "gather" back ends (``fused``: the XLA form of the blur); ``noise`` is a callable giving
    the batch's standard normal noise. The fused back end's pass (:func:`_fused_xla`) does
    the same arithmetic in another order."""
    gamma, contrast, brightness, sigma, noise_std, _ = tf.unstack(draws[:, N_AFFINE:], axis=1)

    def per_image(v):
        return v[:, None, None, None]

    if params.gamma:
        # 255 (x/255)^g as exp(g log x + (1 - g) log 255): 3x faster than tf.pow with a
        # per-image exponent; x = 0 gives log 0 = -inf and exactly 0.
        x = tf.exp(per_image(gamma) * tf.math.log(tf.maximum(x, 0.0))
                   + per_image((1.0 - gamma) * math.log(255.0)))
    if params.contrast or params.brightness_levels:
        # m + c (x - m) + b as c x + (b + (1 - c) m): one multiply-add per pixel
        scale = per_image(contrast) if params.contrast else 1.0
        offset = per_image(brightness) if params.brightness_levels else 0.0
        if params.contrast:
            mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
            offset = offset + (1.0 - scale) * mean
        x = scale * x + offset
    if params.blurs:
        x = (_shift_blur if fused else _blur_subset)(x, sigma, params.blur_sigma)
    if params.noise_levels:
        x = x + per_image(noise_std) * noise()
    return tf.clip_by_value(x, 0.0, 255.0)


def apply_intensity(images: tf.Tensor, draws: tf.Tensor, params: AugmentConfig,
                    backend: str = "kernel") -> tf.Tensor:
    """The intensity transforms of ``draws`` [B, 13] on float images [B, H, W, C] (0..255).

    Transforms that ``params`` turns off are skipped (not computed as identities), so all
    off returns ``images`` itself. ``backend="gather"`` keeps every op XLA-compilable (the
    blur as a shifted sum over the whole batch instead of a convolution of the blurred
    images only).
    """
    if params.intensity_is_identity:
        return images
    seed = _noise_seed(draws[:, N_AFFINE + 5])
    return _intensity(images, draws, params, lambda: noise_field(tf.shape(images), seed),
                      fused=backend == "gather")


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
