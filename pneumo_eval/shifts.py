"""Controlled acquisition shifts on uint8 grayscale images, at three severities each.

A model that only ever saw one hospital's X-ray pipeline meets another window, another
detector, another compression and other burned-in labels in the next batch. These shifts
imitate such changes on images the model has not been trained on (a validation split), so a
robustness report can show which of them moves the scores, without the other hospital's
data. Pure numpy and Pillow (no TensorFlow), deterministic from a seed.

::

    from pneumo_eval import shifts
    shifted = shifts.apply("gamma_dark", 2, images, seed=0)   # uint8 [N,H,W] or [H,W]
    for name in shifts.SHIFTS: ...
    shifts.describe("jpeg", 3)   # 'jpeg: JPEG quality 10 (Pillow scale 1-95)'

Severity 0 returns an unchanged copy; severities 1, 2 and 3 use the parameters below.
Grey levels are on the 0..255 scale; lengths given as a fraction of the image side scale
with the image (so the same shift means the same thing at 150 and 224 px); "side" is the
shorter side of the image.

================= ============================================= ========================
shift             what it does                                  severity 1 / 2 / 3
================= ============================================= ========================
contrast_low      m + c (x - m), m the image's mean grey level  c = 0.75 / 0.55 / 0.40
contrast_high     the same, more contrast (clipped to 0..255)   c = 1.3 / 1.6 / 2.0
gamma_dark        255 (x/255)^g                                 g = 1.4 / 1.8 / 2.5
gamma_light       255 (x/255)^(1/g)                             g = 1.4 / 1.8 / 2.5
brightness_up     x + b grey levels (clipped)                   b = 20 / 40 / 60
brightness_down   x - b grey levels (clipped)                   b = 20 / 40 / 60
blur              Gaussian blur, sigma = f x side               f = 0.004 / 0.008 / 0.016
                                                                (0.6 / 1.2 / 2.4 px at 150)
noise             additive Gaussian noise, std in grey levels   4 / 8 / 16
downsample        down to f x side (antialiased), back up       f = 0.6 / 0.4 / 0.25
                  (bilinear)
jpeg              JPEG re-compression (Pillow quality, 4:2:0)   quality 50 / 25 / 10
crop              cut a margin of f x side from every border,   f = 0.05 / 0.10 / 0.15
                  resize back to the original size
pad               shrink to (1 - 2f) x side and pad each        f = 0.05 / 0.10 / 0.15
                  border with f x side of black (grey 0)
text              lines of white (255) letters and digits in a  1 / 2 / 3 lines, letters
                  random corner (hospital / date labels)        0.045 / 0.06 / 0.075 x side
marker            a white "L" or "R" side marker in a random    letter 0.08 / 0.12 /
                  corner, with a white frame at severity >= 2   0.16 x side
square            a filled white (255) square in a random       side 0.05 / 0.08 / 0.12 x
                  corner (a lead marker or a collimator tab)    side
================= ============================================= ========================

Randomness (corners, letters, noise) is drawn per image from ``numpy.random.default_rng([seed,
i])`` with ``i`` the image's index, so an image's shift depends only on the seed and its index.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pneumo_data.common.errors import UserError

SEVERITIES = (1, 2, 3)


class ShiftError(UserError):
    """A shift was asked for with a bad name, severity or image array (a UserError)."""


# name: (parameter per severity 1..3, unit, description)
PARAMS: dict[str, tuple[tuple[float, float, float], str, str]] = {
    "contrast_low": ((0.75, 0.55, 0.40), "contrast factor about the image mean", "less contrast"),
    "contrast_high": ((1.3, 1.6, 2.0), "contrast factor about the image mean", "more contrast"),
    "gamma_dark": ((1.4, 1.8, 2.5), "gamma exponent", "darker mid-tones"),
    "gamma_light": ((1.4, 1.8, 2.5), "inverse gamma exponent", "lighter mid-tones"),
    "brightness_up": ((20, 40, 60), "grey levels added", "brighter"),
    "brightness_down": ((20, 40, 60), "grey levels subtracted", "darker"),
    "blur": ((0.004, 0.008, 0.016), "Gaussian sigma as a fraction of the side", "blur"),
    "noise": ((4, 8, 16), "noise standard deviation in grey levels", "Gaussian noise"),
    "downsample": ((0.6, 0.4, 0.25), "intermediate size as a fraction of the side",
                   "lower resolution"),
    "jpeg": ((50, 25, 10), "JPEG quality (Pillow scale 1-95)", "JPEG re-compression"),
    "crop": ((0.05, 0.10, 0.15), "margin cut from each border, fraction of the side",
             "border crop, resized back"),
    "pad": ((0.05, 0.10, 0.15), "black border added on each side, fraction of the side",
            "shrunk and padded"),
    "text": ((0.045, 0.06, 0.075), "letter height as a fraction of the side (1/2/3 lines)",
             "burned-in text"),
    "marker": ((0.08, 0.12, 0.16), "letter height as a fraction of the side",
               "L/R side marker"),
    "square": ((0.05, 0.08, 0.12), "square side as a fraction of the side",
               "bright square in a corner"),
}


def parameter(name: str, severity: int) -> float:
    """The parameter of ``name`` at ``severity`` (1..3), in the units of :data:`PARAMS`."""
    _check_name(name)
    if severity not in SEVERITIES:
        raise ShiftError(f"severity must be one of {SEVERITIES} here, got {severity!r}")
    return PARAMS[name][0][severity - 1]


def describe(name: str, severity: int) -> str:
    """A one-line description with the parameter and its unit, e.g. for a report."""
    _check_name(name)
    if severity == 0:
        return f"{name}: none (severity 0)"
    return f"{name}: {PARAMS[name][2]}, {PARAMS[name][1]} = {parameter(name, severity):g}"


# ---------------------------------------------------------------- helpers

def _side(image: np.ndarray) -> int:
    return min(image.shape)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _resize(image: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(image, "L").resize((width, height), resample))


def _corner(rng: np.random.Generator, height: int, width: int, box_h: int, box_w: int,
            margin: int) -> tuple[int, int]:
    """Top-left (x, y) of a box in a corner drawn at random (one of four)."""
    corner = int(rng.integers(4))
    x = margin if corner in (0, 2) else width - margin - box_w
    y = margin if corner in (0, 1) else height - margin - box_h
    return max(0, x), max(0, y)


def _font(height_px: int) -> ImageFont.ImageFont:
    # Pillow's built-in scalable font (Pillow >= 10.1 with FreeType); size in pixels.
    return ImageFont.load_default(size=max(6, int(height_px)))


# ---------------------------------------------------------------- the shifts (one image)

def _contrast(image, value, rng):
    x = image.astype(np.float64)
    mean = x.mean()
    return _to_uint8(mean + value * (x - mean))


def _gamma(image, exponent):
    lut = _to_uint8(255.0 * (np.arange(256) / 255.0) ** exponent)
    return lut[image]


def _brightness(image, offset):
    return _to_uint8(image.astype(np.float64) + offset)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    return kernel / kernel.sum()


def _blur(image, fraction, rng):
    sigma = fraction * _side(image)
    kernel = _gaussian_kernel(sigma)
    radius = len(kernel) // 2
    x = image.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="symmetric")
        x = sum(kernel[k] * np.take(padded, np.arange(k, k + image.shape[axis]), axis=axis)
                for k in range(len(kernel)))
    return _to_uint8(x)


def _noise(image, std, rng):
    return _to_uint8(image.astype(np.float64) + rng.normal(0.0, std, image.shape))


def _downsample(image, fraction, rng):
    height, width = image.shape
    small_h = max(2, int(round(height * fraction)))
    small_w = max(2, int(round(width * fraction)))
    small = _resize(image, small_h, small_w, Image.Resampling.BILINEAR)  # antialiased
    return _resize(small, height, width, Image.Resampling.BILINEAR)


def _jpeg(image, quality, rng):
    buffer = io.BytesIO()
    Image.fromarray(image, "L").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("L"))


def _crop(image, fraction, rng):
    height, width = image.shape
    m = max(1, int(round(fraction * _side(image))))
    inner = image[m:height - m, m:width - m]
    return _resize(np.ascontiguousarray(inner), height, width, Image.Resampling.BILINEAR)


def _pad(image, fraction, rng):
    height, width = image.shape
    m = max(1, int(round(fraction * _side(image))))
    small = _resize(image, height - 2 * m, width - 2 * m, Image.Resampling.BILINEAR)
    out = np.zeros_like(image)
    out[m:height - m, m:width - m] = small
    return out


_TEXT_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"


def _text(image, fraction, rng, lines: int):
    height, width = image.shape
    letter = max(6, int(round(fraction * _side(image))))
    font = _font(letter)
    strings = ["".join(rng.choice(list(_TEXT_CHARS), size=int(rng.integers(6, 10))))
               for _ in range(lines)]
    canvas = Image.fromarray(image.copy(), "L")
    draw = ImageDraw.Draw(canvas)
    boxes = [draw.textbbox((0, 0), s, font=font) for s in strings]
    line_h = int(round(letter * 1.25))
    box_w = max(b[2] - b[0] for b in boxes)
    box_h = line_h * lines
    x, y = _corner(rng, height, width, box_h, min(box_w, width), max(1, letter // 3))
    for k, s in enumerate(strings):
        draw.text((x, y + k * line_h), s, fill=255, font=font)
    return np.asarray(canvas)


def _marker(image, fraction, rng, framed: bool):
    height, width = image.shape
    letter = max(6, int(round(fraction * _side(image))))
    font = _font(letter)
    char = "L" if rng.integers(2) == 0 else "R"
    canvas = Image.fromarray(image.copy(), "L")
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    pad = max(1, letter // 5)
    box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = _corner(rng, height, width, box_h, box_w, max(1, letter // 3))
    draw.text((x + pad - left, y + pad - top), char, fill=255, font=font)
    if framed:
        draw.rectangle([x, y, x + box_w - 1, y + box_h - 1], outline=255,
                       width=max(1, letter // 10))
    return np.asarray(canvas)


def _square(image, fraction, rng):
    height, width = image.shape
    s = max(2, int(round(fraction * _side(image))))
    x, y = _corner(rng, height, width, s, s, max(1, s // 3))
    out = image.copy()
    out[y:y + s, x:x + s] = 255
    return out


ShiftFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _with_param(name: str, fn) -> ShiftFn:
    def shift(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        return fn(image, parameter(name, severity), rng, severity)
    shift.__name__ = name
    shift.__doc__ = f"{PARAMS[name][2]}: {PARAMS[name][1]} {PARAMS[name][0]} at severity 1/2/3"
    return shift


SHIFTS: dict[str, ShiftFn] = {
    "contrast_low": _with_param("contrast_low", lambda im, v, r, s: _contrast(im, v, r)),
    "contrast_high": _with_param("contrast_high", lambda im, v, r, s: _contrast(im, v, r)),
    "gamma_dark": _with_param("gamma_dark", lambda im, v, r, s: _gamma(im, v)),
    "gamma_light": _with_param("gamma_light", lambda im, v, r, s: _gamma(im, 1.0 / v)),
    "brightness_up": _with_param("brightness_up", lambda im, v, r, s: _brightness(im, v)),
    "brightness_down": _with_param("brightness_down", lambda im, v, r, s: _brightness(im, -v)),
    "blur": _with_param("blur", lambda im, v, r, s: _blur(im, v, r)),
    "noise": _with_param("noise", lambda im, v, r, s: _noise(im, v, r)),
    "downsample": _with_param("downsample", lambda im, v, r, s: _downsample(im, v, r)),
    "jpeg": _with_param("jpeg", lambda im, v, r, s: _jpeg(im, v, r)),
    "crop": _with_param("crop", lambda im, v, r, s: _crop(im, v, r)),
    "pad": _with_param("pad", lambda im, v, r, s: _pad(im, v, r)),
    "text": _with_param("text", lambda im, v, r, s: _text(im, v, r, lines=s)),
    "marker": _with_param("marker", lambda im, v, r, s: _marker(im, v, r, framed=s >= 2)),
    "square": _with_param("square", lambda im, v, r, s: _square(im, v, r)),
}
"""name -> fn(image uint8 [H, W], severity 1..3, rng) -> uint8 [H, W]; use :func:`apply`."""


def _check_name(name: str) -> None:
    if name not in PARAMS:
        raise ShiftError(f"unknown shift {name!r}; choose one of {sorted(PARAMS)}")


def apply(name: str, severity: int, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Applies shift ``name`` at ``severity`` (0..3) to uint8 images.

    Args:
      name: a key of :data:`SHIFTS`.
      severity: 0 (an unchanged copy), 1, 2 or 3.
      images: uint8 ``[H, W]`` or ``[N, H, W]``, at least 16 px on each side.
      seed: integer seed; image ``i`` uses ``numpy.random.default_rng([seed, i])``.

    Returns:
      A new uint8 array of the same shape.
    """
    _check_name(name)
    if not isinstance(severity, (int, np.integer)) or isinstance(severity, bool) \
            or not 0 <= severity <= 3:
        raise ShiftError(f"severity must be 0, 1, 2 or 3, got {severity!r}")
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ShiftError(f"images must be uint8 grayscale, got dtype {array.dtype}")
    if array.ndim not in (2, 3):
        raise ShiftError(f"images must be [H, W] or [N, H, W], got shape {array.shape}")
    if min(array.shape[-2:]) < 16:
        raise ShiftError(f"images must be at least 16x16 pixels, got {array.shape[-2:]}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ShiftError(f"seed must be a non-negative integer, got {seed!r}")
    if severity == 0:
        return array.copy()
    batch = array[None] if array.ndim == 2 else array
    fn = SHIFTS[name]
    out = np.empty_like(batch)
    for i, image in enumerate(batch):
        out[i] = fn(np.ascontiguousarray(image), int(severity),
                    np.random.default_rng([int(seed), i]))
    return out[0] if array.ndim == 2 else out
