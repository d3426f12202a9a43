"""Stage (a) in TensorFlow ops: the bytes signature of a SavedModel decodes with it.

Gives bit for bit what :mod:`pneumo_data.preprocess.stored` (Pillow) gives, for JPEG and PNG
(see the package docstring for how, step by step).
"""

from __future__ import annotations

import tensorflow as tf

from pneumo_data.preprocess.exif import PNG_SIGNATURE
from pneumo_data.preprocess.exif_tf import _bytes_at, _uint, exif_orientation_tf, orient_tf
from pneumo_data.preprocess.spec import (
    DEFAULT_SPEC,
    DRAFT_SCALES,
    PRECISION_BITS,
    PreprocessSpec,
)


def pil_bilinear_coefficients_tf(in_size, out_size):
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for BILINEAR, in TF.

    Args:
      in_size, out_size: int32 scalars (tensors or ints).

    Returns:
      ``(index, weight)``, both int32 ``[out_size, K]``: output ``i`` is
      ``(2^21 + sum_k in[index[i, k]] * weight[i, k]) >> 22`` clipped to 0..255.
      Padding taps have weight 0 (their index is clamped into range).
    """
    f64 = tf.float64
    in_size = tf.cast(in_size, tf.int32)
    out_size = tf.cast(out_size, tf.int32)
    scale = tf.cast(in_size, f64) / tf.cast(out_size, f64)
    filterscale = tf.maximum(scale, tf.constant(1.0, f64))
    support = filterscale * 1.0  # BILINEAR's support is 1
    ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.cast(tf.range(out_size), f64) + 0.5) * scale
    ss = 1.0 / filterscale
    # C's (int) truncates toward zero; the clamp to >= 0 makes floor equivalent.
    xmin = tf.maximum(tf.cast(tf.floor(center - support + 0.5), tf.int32), 0)
    xmax = tf.minimum(tf.cast(tf.floor(center + support + 0.5), tf.int32), in_size) - xmin
    taps = tf.range(ksize)
    position = taps[None, :] + xmin[:, None]
    arg = (tf.cast(position, f64) - center[:, None] + 0.5) * ss
    weight = tf.where(tf.abs(arg) < 1.0, 1.0 - tf.abs(arg), tf.zeros_like(arg))
    weight = tf.where(taps[None, :] < xmax[:, None], weight, tf.zeros_like(weight))
    # The C loop sums left to right; a sequential fold keeps the same rounding.
    total = tf.foldl(lambda acc, column: acc + column, tf.transpose(weight),
                     initializer=tf.zeros([out_size], f64))
    weight = tf.where(total[:, None] != 0.0, weight / total[:, None], weight)
    fixed = tf.cast(tf.floor(0.5 + weight * float(1 << PRECISION_BITS)), tf.int32)
    index = tf.minimum(position, in_size - 1)
    return index, fixed


def _pil_pass(image, index, weight, axis: int):
    """One Pillow resampling pass of int32 ``image`` along ``axis`` (-1 or -2)."""
    if axis == -1:
        taps = tf.gather(image, index, axis=-1)              # [..., H, out, K]
        total = tf.reduce_sum(taps * weight, axis=-1)
    else:
        taps = tf.gather(image, index, axis=-2)              # [..., out, K, W]
        total = tf.reduce_sum(taps * weight[:, :, None], axis=-2)
    total = total + (1 << (PRECISION_BITS - 1))
    return tf.clip_by_value(tf.bitwise.right_shift(total, PRECISION_BITS), 0, 255)


def pil_bilinear_resize_tf(images, height, width):
    """Pillow's ``Image.resize((width, height), BILINEAR)`` on uint8 ``[..., H, W]``, in TF.

    Horizontal pass first, then vertical, each rounded to 8 bits, as Pillow does.
    ``height`` and ``width`` may be tensors. Returns uint8 ``[..., height, width]``.
    """
    x = tf.cast(images, tf.int32)
    shape = tf.shape(x)
    index, weight = pil_bilinear_coefficients_tf(shape[-1], width)
    x = _pil_pass(x, index, weight, -1)
    index, weight = pil_bilinear_coefficients_tf(shape[-2], height)
    x = _pil_pass(x, index, weight, -2)
    return tf.cast(x, tf.uint8)


def resize_stored_tf(gray, spec: PreprocessSpec):
    """The ``stretch``/``pad`` resize of stage (a) on uint8 ``[..., H, W]`` -> ``[..., S, S]``."""
    size = spec.stored_size
    if spec.resize == "stretch":
        out = pil_bilinear_resize_tf(gray, size, size)
    else:
        shape = tf.shape(gray)
        height, width = shape[-2], shape[-1]
        scale = tf.constant(float(size), tf.float64) / tf.cast(tf.maximum(height, width),
                                                               tf.float64)
        # tf.round is half to even, like Python's round() in pad_size().
        new_w = tf.maximum(1, tf.cast(tf.round(tf.cast(width, tf.float64) * scale), tf.int32))
        new_h = tf.maximum(1, tf.cast(tf.round(tf.cast(height, tf.float64) * scale), tf.int32))
        scaled = pil_bilinear_resize_tf(gray, new_h, new_w)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        rank = tf.rank(scaled)
        paddings = tf.concat([tf.zeros([rank - 2, 2], tf.int32),
                              [[top, size - new_h - top], [left, size - new_w - left]]], 0)
        out = tf.pad(scaled, paddings)
    return tf.ensure_shape(out, [None] * (gray.shape.rank - 2) + [size, size])



def luma_tf(rgb):
    """:func:`luma` in TF: uint8 ``[..., 3+]`` -> uint8 ``[...]``."""
    x = tf.cast(rgb[..., :3], tf.int32)
    y = x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000
    return tf.cast(tf.bitwise.right_shift(y, 16), tf.uint8)


def _check(ok, message):
    return tf.debugging.Assert(ok, [message])


def _decode_jpeg_tf(data, spec: PreprocessSpec):
    shape = tf.io.extract_jpeg_shape(data)
    height, width, components = shape[0], shape[1], shape[2]
    if spec.fast_jpeg:
        scale = tf.minimum(width // (2 * spec.stored_size), height // (2 * spec.stored_size))
        ratio_index = tf.where(scale >= 8, 0, tf.where(scale >= 4, 1, tf.where(scale >= 2, 2, 3)))
    else:
        ratio_index = tf.constant(3)
    cmyk = components == 4

    def decoder(ratio):
        def fn():
            return tf.cond(
                cmyk,
                lambda: luma_tf(tf.io.decode_jpeg(data, channels=3, ratio=ratio,
                                                  dct_method="INTEGER_ACCURATE")),
                lambda: tf.io.decode_jpeg(data, channels=1, ratio=ratio,
                                          dct_method="INTEGER_ACCURATE")[..., 0])
        return fn

    pixels = tf.cast(width, tf.int64) * tf.cast(height, tf.int64)
    with tf.control_dependencies([_check(pixels <= spec.max_pixels,
                                         f"image too large: more than max_pixels "
                                         f"{spec.max_pixels} pixels")]):
        return tf.switch_case(ratio_index, [decoder(r) for r in DRAFT_SCALES])


def _decode_png_tf(data, spec: PreprocessSpec):
    ihdr = _bytes_at(data, 16, 8)
    width = _uint(ihdr[0:4], tf.constant(False))
    height = _uint(ihdr[4:8], tf.constant(False))
    with tf.control_dependencies([_check(width * height <= spec.max_pixels,
                                         f"image too large: more than max_pixels "
                                         f"{spec.max_pixels} pixels")]):
        wide = tf.io.decode_png(data, channels=0, dtype=tf.uint16)
    narrow = tf.cast(tf.bitwise.right_shift(wide, 8), tf.uint8)
    channels = tf.shape(narrow)[-1]
    return tf.cond(channels >= 3, lambda: luma_tf(narrow), lambda: narrow[..., 0])


def decode_stored_tf(data, spec: PreprocessSpec = DEFAULT_SPEC):
    """Stage (a) in TensorFlow: scalar string (JPEG or PNG bytes) -> uint8 ``[S, S, 1]``.

    Gives exactly :func:`decode_stored`'s pixels. Fails (InvalidArgumentError)
    with a readable message on DICOM, on other formats and on oversized images.
    """
    data = tf.convert_to_tensor(data, tf.string)
    head = _bytes_at(data, 0, 8)
    is_jpeg = tf.reduce_all(tf.equal(head[:3], [0xFF, 0xD8, 0xFF]))
    is_png = tf.reduce_all(tf.equal(head, list(PNG_SIGNATURE)))
    is_dicom = tf.reduce_all(tf.equal(_bytes_at(data, 128, 4), [0x44, 0x49, 0x43, 0x4D]))
    empty = tf.equal(tf.strings.length(data), 0)
    message = tf.where(
        empty, "empty input (0 bytes)",
        tf.where(is_dicom,
                 "DICOM is not decoded inside the serving graph: read it with pydicom and "
                 "call the serve_pixels signature",
                 "not a JPEG or PNG (the serving graph decodes only these; convert other "
                 "formats, or decode them yourself and call serve_pixels)"))
    checks = [_check(tf.logical_and(tf.logical_not(empty), tf.logical_or(is_jpeg, is_png)),
                     message)]
    with tf.control_dependencies(checks):
        gray = tf.cond(is_jpeg, lambda: _decode_jpeg_tf(data, spec),
                       lambda: _decode_png_tf(data, spec))
    gray = orient_tf(gray, exif_orientation_tf(data))
    out = resize_stored_tf(gray, spec)
    return tf.ensure_shape(out[..., None], [spec.stored_size, spec.stored_size, 1])

