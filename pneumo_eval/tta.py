"""Test-time augmentation: the mean probability over a few mild views of each image.

Modes (``--tta`` of evaluate and predict):

============= =================================================================
``none``      the image as it is (one view)
``flip``      the image and its left-right mirror (two views)
``flip_scale`` those two at sampling scales 1, 0.9 and 1.1 (six views): 0.9 zooms in
              10 %, 1.1 zooms out 10 % with the border continued by its edge pixels,
              as the training augmentation's zoom does (bilinear, rounded to uint8)
============= =================================================================

The views stay inside the training augmentation's ranges (flip, zoom), so they ask the model
what it has learnt to answer. A threshold must be chosen on scores of the same mode: evaluate
chooses it on val with the same ``--tta``, and its report records the mode.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from pneumo_data.augment import compose, warp
from pneumo_eval.config import TTA_MODES as MODES

SCALES = {"none": (1.0,), "flip": (1.0,), "flip_scale": (1.0, 0.9, 1.1)}


def views(mode: str) -> list[tuple[bool, float]]:
    """(mirrored, sampling scale) of every view of ``mode``."""
    if mode not in MODES:
        raise ValueError(f"tta must be one of {MODES}, got {mode!r}")
    flips = (False,) if mode == "none" else (False, True)
    return [(flip, scale) for scale in SCALES[mode] for flip in flips]


def scaled(images: np.ndarray, scale: float) -> np.ndarray:
    """uint8 [N, H, W, C] resampled about the centre at sampling scale ``scale`` (>1 shows
    more of the image), bilinear with nearest-edge fill, rounded to uint8."""
    if scale == 1.0:
        return images
    n, height, width = images.shape[:3]
    ones, zeros = tf.ones([n]), tf.zeros([n])
    transforms = compose(zeros, zeros, ones * scale, ones * scale, zeros, zeros, ones,
                         float(height), float(width))
    out = warp(tf.cast(images, tf.float32), transforms)
    return np.asarray(tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8))


def view(images: np.ndarray, flip: bool, scale: float) -> np.ndarray:
    out = scaled(images, scale)
    return np.ascontiguousarray(out[:, :, ::-1]) if flip else out


def tta_scores(score: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
               mode: str = "none") -> np.ndarray:
    """The mean of ``score`` (uint8 [N, H, W, C] -> probabilities [N]) over the views."""
    all_views = views(mode)
    if len(all_views) == 1:
        return np.asarray(score(images), np.float64)
    total = np.zeros(len(images), np.float64)
    for flip, scale in all_views:
        total += np.asarray(score(view(images, flip, scale)), np.float64)
    return total / len(all_views)
