"""The intensity transforms of the augmentation (gamma, contrast, brightness, blur, noise) on
float images, and the batch's noise: the "kernel" and "gather" back ends' form, and the parts
(blur taps, noise bank) that the fused back end (:mod:`pneumo_data.augment_fused`) shares.
See :mod:`pneumo_data.augment` for what each transform does.
"""

from __future__ import annotations

import math

import tensorflow as tf

from pneumo_data.augment_draws import N_AFFINE
from pneumo_data.config import AugmentConfig


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
    (a sigma of 0 is exactly the identity, so the result is the same, for less work). A batch
    in which no image drew a blur passes whole: the convolution is not run on an empty batch,
    whose zero-channel filter oneDNN's depthwise kernel refuses ("filter must not have zero
    elements", seen on Intel Xeon CPUs)."""
    chosen = tf.where(sigma > 0)[:, 0]

    def blur_chosen():
        blurred = _blur(tf.gather(images, chosen), tf.gather(sigma, chosen), max_sigma)
        return tf.tensor_scatter_nd_update(images, chosen[:, None], blurred)

    return tf.cond(tf.size(chosen) > 0, blur_chosen, lambda: tf.identity(images))


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
