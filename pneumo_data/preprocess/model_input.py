"""Stage (b): stored ``[..., S, S, 1]`` -> model input ``[..., M, M, 1]``, integer weights.

:func:`axis_weights` defines the map; :func:`to_model_input_np` computes it in numpy and
:func:`pneumo_data.preprocess.model_input_tf.to_model_input` in TensorFlow (the pipeline,
predict, every export), with the same integers, so all give the same bits.
"""

from __future__ import annotations

import numpy as np


def axis_weights(stored: int, model: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer resampling weights along one axis, ``stored`` -> ``model`` pixels.

    Returns ``(index [model, K], weight [model, K], denominator)``: output ``i``
    is ``sum_k x[index[i, k]] * weight[i, k] / denominator``.

    * shrinking: the exact box average (TF's ``area``): output ``i`` covers input
      ``[i S/M, (i+1) S/M)``; in units of 1/M pixel every overlap is an integer
      and they sum to S.
    * growing: half-pixel-centre bilinear (TF's ``bilinear``), source position
      ``((2i+1) S - M) / 2M`` clamped to the edge; weights sum to 2M.
    * equal: the identity.
    """
    if stored < 1 or model < 1:
        raise ValueError(f"sizes must be positive, got {stored} -> {model}")
    if stored == model:
        return np.arange(model)[:, None], np.ones((model, 1), np.int64), 1
    if stored > model:
        k = -(-stored // model) + 1
        index = np.zeros((model, k), np.int64)
        weight = np.zeros((model, k), np.int64)
        for i in range(model):
            lo, hi = i * stored, (i + 1) * stored
            first = lo // model
            for t in range(k):
                j = min(first + t, stored - 1)
                overlap = min((first + t + 1) * model, hi) - max((first + t) * model, lo)
                index[i, t] = j
                weight[i, t] = max(0, overlap) if first + t < stored else 0
        denominator = stored
    else:
        index = np.zeros((model, 2), np.int64)
        weight = np.zeros((model, 2), np.int64)
        for i in range(model):
            numerator = (2 * i + 1) * stored - model
            low = numerator // (2 * model)
            frac = numerator - low * 2 * model
            index[i] = (min(max(low, 0), stored - 1), min(max(low + 1, 0), stored - 1))
            weight[i] = (2 * model - frac, frac)
        denominator = 2 * model
    assert (weight.sum(axis=1) == denominator).all()
    return index, weight, denominator



def to_model_input_np(images: np.ndarray, model_size: int) -> np.ndarray:
    """:func:`to_model_input` in numpy (int64), for checks and TF-free callers."""
    images = np.asarray(images)
    stored = images.shape[-2]
    if stored == model_size:
        return images
    index, weight, d_axis = axis_weights(stored, model_size)
    denominator = d_axis * d_axis
    x = images[..., 0].astype(np.int64)
    x = (x[..., index] * weight).sum(-1)
    x = (np.take(x, index, axis=-2) * weight[:, :, None]).sum(-2)
    half = denominator // 2
    quotient, remainder = np.divmod(x + half, denominator)
    if denominator % 2 == 0:
        quotient -= ((remainder == 0) & (quotient % 2 == 1)).astype(np.int64)
    return np.clip(quotient, 0, 255).astype(np.uint8)[..., None]
