"""Stage 3 of ingest: decode any image file once into a square 8-bit grayscale array.

The decoding itself is stage (a) of :mod:`pneumo_data.preprocess`, the one definition of
"file bytes -> model input" that ``predict`` and every export use too (the serving graph runs
a TensorFlow copy of it that gives the same pixels bit for bit). Pillow does the work here:
JPEG, PNG, BMP, TIFF, GIF, WebP; EXIF orientation, CMYK JPEGs, 16-bit PNGs, palette and alpha
images; a decompression-bomb guard; and large JPEGs decoded at a reduced DCT scale
(``Image.draft``, both sides kept >= twice the stored size), which makes full-resolution
X-rays several times cheaper to ingest.

Every failure raises :class:`DecodeError` with a short human reason; the ingest job records it
as the file's skip reason and never crashes on it.
"""

from __future__ import annotations

import numpy as np

from pneumo_data.preprocess import (
    DEFAULT_MAX_PIXELS,
    RESIZE_MODES,
    DecodeError,
    PreprocessSpec,
    decode_stored,
)

__all__ = ["DEFAULT_MAX_PIXELS", "RESIZE_MODES", "DecodeError", "decode_to_gray",
           "prepare_spec"]


def prepare_spec(config) -> PreprocessSpec:
    """The stage (a) settings of a :class:`~pneumo_data.prepare.PrepareConfig`."""
    return PreprocessSpec(stored_size=config.image_size, resize=config.resize,
                          fast_jpeg=config.fast_jpeg, max_pixels=config.max_pixels)


def decode_to_gray(data: bytes, size: int, resize: str = "stretch",
                   max_pixels: int = DEFAULT_MAX_PIXELS, fast_jpeg: bool = True) -> np.ndarray:
    """Decodes encoded image bytes to a ``[size, size]`` uint8 grayscale array.

    :func:`pneumo_data.preprocess.decode_stored` with these settings.

    Args:
      data: the file's bytes (JPEG, PNG, BMP, TIFF, ... anything Pillow reads).
      size: side of the square output.
      resize: ``stretch`` (ignore aspect ratio, as ImageDataGenerator did) or
        ``pad`` (keep aspect ratio, pad with black).
      max_pixels: refuse images with more pixels than this (decompression bombs).
      fast_jpeg: let JPEGs decode at a reduced DCT scale no smaller than needed.

    Raises:
      DecodeError: empty, truncated, non-image, too large or unsupported input.
    """
    return decode_stored(data, PreprocessSpec(size, resize, fast_jpeg, max_pixels))
