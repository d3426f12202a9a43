"""The TensorFlow twin of :mod:`pneumo_data.preprocess.exif`: the same EXIF walk in graph ops
(a SavedModel's bytes signature runs it)."""

from __future__ import annotations

import tensorflow as tf

from pneumo_data.preprocess.exif import (
    MAX_IFD_ENTRIES,
    MAX_SEGMENTS,
    ORIENTATION_TAG,
    PNG_SIGNATURE,
)


def _bytes_at(data, pos, length):
    """``length`` bytes of string ``data`` at ``pos`` as int32 (zeros past the end)."""
    n = tf.strings.length(data)
    pos = tf.clip_by_value(pos, 0, n)
    chunk = tf.strings.substr(data, pos, length)
    return tf.cast(tf.io.decode_raw(chunk, tf.uint8, fixed_length=length), tf.int32)


def _uint(b, little):
    """Unsigned integer from int32 bytes ``b`` (2 or 4 of them), in the given byte order."""
    n = b.shape[0]
    weights_be = tf.constant([256 ** (n - 1 - i) for i in range(n)], tf.int64)
    weights = tf.where(little, tf.reverse(weights_be, [0]), weights_be)
    return tf.reduce_sum(tf.cast(b, tf.int64) * weights)


def _jpeg_tiff_offset_tf(data):
    n = tf.strings.length(data)

    def cond(i, pos, found, done):
        return tf.logical_and(i < MAX_SEGMENTS, tf.logical_not(done))

    def body(i, pos, found, done):
        head = _bytes_at(data, pos, 10)
        bad = tf.logical_or(pos + 4 > n, head[0] != 0xFF)
        stop = tf.logical_or(bad, tf.logical_or(head[1] == 0xDA, head[1] == 0xD9))
        exif = tf.reduce_all(tf.equal(head[4:10], [0x45, 0x78, 0x69, 0x66, 0, 0]))
        hit = tf.logical_and(tf.logical_not(stop), tf.logical_and(head[1] == 0xE1, exif))
        length = head[2] * 256 + head[3]
        found = tf.where(hit, pos + 10, found)
        return i + 1, pos + 2 + length, found, tf.logical_or(stop, hit)

    _, _, found, _ = tf.while_loop(cond, body, (0, 2, -1, False))
    return found


def _png_tiff_offset_tf(data):
    n = tf.strings.length(data)

    def cond(i, pos, found, done):
        return tf.logical_and(i < MAX_SEGMENTS, tf.logical_not(done))

    def body(i, pos, found, done):
        head = _bytes_at(data, pos, 8)
        kind = head[4:8]
        idat = tf.reduce_all(tf.equal(kind, [0x49, 0x44, 0x41, 0x54]))
        iend = tf.reduce_all(tf.equal(kind, [0x49, 0x45, 0x4E, 0x44]))
        stop = tf.logical_or(pos + 8 > n, tf.logical_or(idat, iend))
        exif = tf.reduce_all(tf.equal(kind, [0x65, 0x58, 0x49, 0x66]))
        hit = tf.logical_and(tf.logical_not(stop), exif)
        length = tf.cast(_uint(head[0:4], tf.constant(False)), tf.int32)
        found = tf.where(hit, pos + 8, found)
        return i + 1, pos + 12 + length, found, tf.logical_or(stop, hit)

    _, _, found, _ = tf.while_loop(cond, body, (0, 8, -1, False))
    return found


def _tiff_orientation_tf(data, tiff):
    n = tf.cast(tf.strings.length(data), tf.int64)
    header = _bytes_at(data, tiff, 8)
    ii = tf.reduce_all(tf.equal(header[0:2], [0x49, 0x49]))
    mm = tf.reduce_all(tf.equal(header[0:2], [0x4D, 0x4D]))
    ifd = _uint(header[4:8], ii)
    start = tf.cast(tiff, tf.int64) + ifd
    readable = tf.logical_and(tf.logical_or(ii, mm), start + 2 <= n)
    start32 = tf.cast(tf.minimum(start, n), tf.int32)
    count = tf.where(readable, _uint(_bytes_at(data, start32, 2), ii),
                     tf.constant(0, tf.int64))
    count = tf.cast(tf.minimum(count, MAX_IFD_ENTRIES), tf.int32)
    entries = tf.reshape(_bytes_at(data, start32 + 2, 12 * MAX_IFD_ENTRIES),
                         [MAX_IFD_ENTRIES, 12])
    b = tf.cast(entries, tf.int64)

    def field(lo, width):
        value = tf.zeros([MAX_IFD_ENTRIES], tf.int64)
        for k in range(width):
            shift_le, shift_be = 8 * k, 8 * (width - 1 - k)
            value += b[:, lo + k] * tf.where(ii, tf.constant(2 ** shift_le, tf.int64),
                                             tf.constant(2 ** shift_be, tf.int64))
        return value

    tags, kinds = field(0, 2), field(2, 2)
    minus_one = tf.constant(-1, tf.int64)
    value = tf.where(kinds == 3, field(8, 2), tf.where(kinds == 4, field(8, 4), minus_one))
    # Entries wholly inside the file and inside the IFD's count.
    inside = (tf.range(MAX_IFD_ENTRIES, dtype=tf.int64) * 12 + start + 2 + 12) <= n
    valid = tf.logical_and(tf.range(MAX_IFD_ENTRIES) < count, inside)
    match = tf.logical_and(valid, tags == ORIENTATION_TAG)
    any_match = tf.reduce_any(match)
    first = tf.argmax(tf.cast(match, tf.int32), output_type=tf.int32)
    one = tf.constant(1, tf.int64)
    orientation = tf.where(any_match, value[first], one)
    orientation = tf.where(tf.logical_and(orientation >= 1, orientation <= 8), orientation, one)
    return tf.cast(tf.where(readable, orientation, one), tf.int32)


def exif_orientation_tf(data):
    """:func:`exif_orientation` in TF ops on a scalar string tensor; int32 scalar."""
    head = _bytes_at(data, 0, 8)
    is_jpeg = tf.reduce_all(tf.equal(head[:3], [0xFF, 0xD8, 0xFF]))
    is_png = tf.reduce_all(tf.equal(head, list(PNG_SIGNATURE)))
    tiff = tf.case([(is_jpeg, lambda: _jpeg_tiff_offset_tf(data)),
                    (is_png, lambda: _png_tiff_offset_tf(data))],
                   default=lambda: tf.constant(-1))
    return tf.cond(tiff >= 0, lambda: _tiff_orientation_tf(data, tiff), lambda: tf.constant(1))


def orient_tf(image, orientation):
    """:func:`orient` for an ``[H, W]`` tensor and an int32 orientation."""
    t = tf.transpose
    branches = [
        lambda: image,
        lambda: image[:, ::-1],
        lambda: image[::-1, ::-1],
        lambda: image[::-1, :],
        lambda: t(image),
        lambda: t(image)[:, ::-1],          # clockwise 90: transpose, then mirror
        lambda: t(image[::-1, ::-1]),
        lambda: t(image)[::-1, :],          # counter-clockwise 90
    ]
    index = tf.clip_by_value(orientation, 1, 8) - 1
    return tf.switch_case(index, branches)


