"""Stage 3 of ingest: decode any image file once into a square 8-bit grayscale array.

Pillow does the decoding because it handles what real X-ray folders hold and
``tf.io.decode_image`` does not: EXIF orientation, CMYK JPEGs, 16-bit PNGs,
palette and alpha images, and a decompression-bomb guard. It also decodes large
JPEGs at a reduced DCT scale (``Image.draft``), which makes full-resolution
X-rays several times cheaper to ingest without visible loss (the result is then
resized with antialiasing to the stored size).

Every failure raises :class:`DecodeError` with a short human reason; the
ingest job records it as a skip, never crashes on it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("stretch", "pad")
DEFAULT_MAX_PIXELS = 80_000_000  # about 9000x9000; the largest Kermany X-ray is ~3000x2700


class DecodeError(ValueError):
    """The file is not a decodable image; ``str(error)`` is the reason."""


def _to_grayscale(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image)
        if image.mode == "F":
            array = np.clip(array, 0.0, 1.0) * 255.0 if array.max() <= 1.0 else array
            return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
        # 16-bit: map the full uint16 range linearly onto 0..255.
        array = array.astype(np.uint32)
        return Image.fromarray((np.clip(array, 0, 65535) >> 8).astype(np.uint8), "L")
    if image.mode == "L":
        return image
    if image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    if image.mode in ("LA", "RGBA", "PA", "P", "1", "RGB", "La", "RGBa"):
        return image.convert("L")
    raise DecodeError(f"unsupported image mode {image.mode}")


def _resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    if mode == "stretch":
        return image.resize((size, size), Image.Resampling.BILINEAR)
    if mode == "pad":
        scale = size / max(image.size)
        width = max(1, round(image.size[0] * scale))
        height = max(1, round(image.size[1] * scale))
        scaled = image.resize((width, height), Image.Resampling.BILINEAR)
        canvas = Image.new("L", (size, size), 0)
        canvas.paste(scaled, ((size - width) // 2, (size - height) // 2))
        return canvas
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")


def decode_to_gray(data: bytes, size: int, resize: str = "stretch",
                   max_pixels: int = DEFAULT_MAX_PIXELS, fast_jpeg: bool = True) -> np.ndarray:
    """Decodes encoded image bytes to a ``[size, size]`` uint8 grayscale array.

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
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError(
                    f"image too large: {width}x{height} = {width * height} pixels "
                    f"> max_pixels {max_pixels} (possible decompression bomb)")
            if width < 1 or height < 1:
                raise DecodeError(f"image has no pixels ({width}x{height})")
            if fast_jpeg and image.format == "JPEG":
                # Only shrink by DCT scaling while both sides stay >= 2x the target,
                # so the antialiased resize afterwards still has real detail.
                image.draft("L", (2 * size, 2 * size))
            image.load()
            image = ImageOps.exif_transpose(image)
            gray = _to_grayscale(image)
            return np.asarray(_resize(gray, size, resize), dtype=np.uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DecodeError(f"image too large (decompression bomb guard): {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise DecodeError(f"corrupt or truncated image: {error}") from None
