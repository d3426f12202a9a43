"""Stage (a) with Pillow: encoded file bytes -> the stored uint8 ``[S, S]`` grayscale image.

Its TensorFlow twin is :mod:`pneumo_data.preprocess.stored_tf`; the package docstring lists
how the two agree step by step. Use :func:`pneumo_data.preprocess.decode` (DICOM included)
rather than :func:`decode_stored` directly.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from pneumo_data.preprocess.exif import ORIENTATION_TAG, exif_orientation, orient
from pneumo_data.preprocess.spec import (
    DEFAULT_SPEC,
    DecodeError,
    PreprocessSpec,
    pad_size,
)


def luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's RGB -> L: ``(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`` on uint8 [..., 3]."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)



def _pil_to_gray(image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit: the high byte, as libpng/TF's uint16 >> 8.
        return (np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    if image.mode == "F":
        array = np.asarray(image, np.float64)
        array = array * 255.0 if array.max() <= 1.0 else array
        return np.clip(array, 0, 255).astype(np.uint8)
    if image.mode == "L":
        return np.asarray(image, np.uint8)
    if image.mode in ("LA", "La"):
        return np.asarray(image.getchannel(0), np.uint8)
    if image.mode in ("1", "P", "PA"):
        image = image.convert("RGB") if image.mode != "1" else image.convert("L")
        return np.asarray(image, np.uint8) if image.mode == "L" else luma(np.asarray(image))
    if image.mode in ("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        if image.mode != "RGB":
            image = image.convert("RGB") if image.mode != "RGBa" else image.convert("RGBA")
        return luma(np.asarray(image)[..., :3])
    raise DecodeError(f"unsupported image mode {image.mode}")


def pil_bilinear_resize(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow BILINEAR resize of uint8 ``[H, W]``: the horizontal pass, then the vertical one.

    Two one-axis ``Image.resize`` calls, each a single Pillow pass. Pillow 13
    itself runs the vertical pass first when the height shrinks much more than
    the width (python-pillow/Pillow#9549), which moves a few pixels by one grey
    level; fixing the order here keeps the stored images independent of the
    Pillow version (Pillow <= 12 always went horizontal first) and equal to
    :func:`pil_bilinear_resize_tf`.
    """
    image = Image.fromarray(np.ascontiguousarray(gray, np.uint8), "L")
    if image.size[0] != width:
        image = image.resize((width, image.size[1]), Image.Resampling.BILINEAR)
    if image.size[1] != height:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, np.uint8)


def resize_stored(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The last step of stage (a) with Pillow: uint8 ``[H, W]`` -> ``[S, S]`` (``stretch`` or
    ``pad``), exactly :func:`resize_stored_tf`. DICOM ingest resizes its windowed image with it,
    so a windowed image sent to a SavedModel's ``serve_pixels`` gets the same pixels."""
    return _pil_resize(np.asarray(gray, np.uint8), spec.stored_size, spec.resize)


def _pil_resize(gray: np.ndarray, size: int, mode: str) -> np.ndarray:
    if mode == "stretch":
        return pil_bilinear_resize(gray, size, size)
    width, height = pad_size(gray.shape[1], gray.shape[0], size)
    scaled = pil_bilinear_resize(gray, height, width)
    canvas = np.zeros((size, size), np.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    canvas[top:top + height, left:left + width] = scaled
    return canvas



_OPEN_LOCK = threading.Lock()


def _open(data: bytes):
    """``Image.open`` (the header only) with Pillow's own decompression-bomb limit lifted:
    ``max_pixels`` governs, checked right after (a ``--max_pixels`` above Pillow's
    89,478,485 must admit such images). Pillow's limit is a module global, so the lift and
    its restore happen under a lock; decoding proper runs outside it."""
    with _OPEN_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def decode_stored(data: bytes, spec: PreprocessSpec = DEFAULT_SPEC) -> np.ndarray:
    """Stage (a) with Pillow: encoded bytes -> uint8 ``[S, S]`` (what ingest stores).

    Any format Pillow reads; JPEG and PNG give exactly what
    :func:`decode_stored_tf` gives.

    Raises:
      DecodeError: empty, truncated, non-image, too large or unsupported input.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    size = spec.stored_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(data)
            width, height = image.size
            if width * height > spec.max_pixels:
                raise DecodeError(
                    f"image too large: {width}x{height} = {width * height} pixels "
                    f"> max_pixels {spec.max_pixels} (possible decompression bomb; --max_pixels "
                    f"raises the limit)")
            if width < 1 or height < 1:
                raise DecodeError(f"image has no pixels ({width}x{height})")
            if image.format == "JPEG":
                # Always the libjpeg grayscale output (Y for colour JPEGs); a reduced
                # DCT scale only while both sides stay >= 2S.
                image.draft("L", (2 * size, 2 * size) if spec.fast_jpeg else None)
            image.load()
            if image.format in ("JPEG", "PNG"):
                orientation = exif_orientation(data)
            else:
                orientation = int(image.getexif().get(ORIENTATION_TAG, 1))
            gray = orient(_pil_to_gray(image), orientation)
            return _pil_resize(gray, size, spec.resize)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DecodeError(f"image too large (decompression bomb guard): {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise DecodeError(f"corrupt or truncated image: {error}") from None

