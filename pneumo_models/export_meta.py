"""The metadata files of the exports, and the one module that knows them (no TensorFlow here).

* ``serving.json`` inside a SavedModel (``assets.extra/``, TF Serving's place for extra files):
  the preprocessing settings, the threshold and where it came from, the model file's sha256, the
  signatures and the software versions (written by :mod:`pneumo_models.serving`);
* ``litert.json`` beside the LiteRT flatbuffers: the same for the edge files, with the int8
  calibration's provenance (written by :mod:`pneumo_models.litert`).

``predict`` and ``robustness`` read them here before TensorFlow loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pneumo_data.common import files
from pneumo_data.common.errors import UserError

META_DIR = "assets.extra"        # in the SavedModel (TF Serving's place for extra files)
SERVING_META = "serving.json"
LITERT_META = "litert.json"
DECISIONS = ("normal", "pneumonia")
DEFAULT_THRESHOLD_SOURCE = "default 0.5: no threshold chosen by an evaluation"
VARIANTS = ("float32", "float16", "int8")


class ExportError(UserError):
    """The export cannot run with these inputs; the message says why."""


def model_size(model) -> int:
    """M, the side of a pneumo model's square one-channel uint8 input."""
    shape = model.inputs[0].shape
    if shape[1] is None or shape[1] != shape[2] or shape[3] != 1:
        raise ExportError(f"expected a square one-channel model input, got {shape}")
    return int(shape[1])


def serving_meta_path(saved_model_dir: str | os.PathLike) -> Path:
    return Path(saved_model_dir) / META_DIR / SERVING_META


def load_serving_meta(saved_model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``serving.json`` :func:`pneumo_models.serving.export_saved_model` wrote."""
    path = serving_meta_path(saved_model_dir)
    if not path.exists():
        raise ExportError(f"{saved_model_dir} has no {META_DIR}/{SERVING_META}: not a SavedModel "
                          f"written by pneumo_models.export")
    return files.read_json(path, "serving metadata")


def load_litert_meta(tflite: str | os.PathLike) -> dict[str, Any]:
    """The ``litert.json`` beside a flatbuffer written by :mod:`pneumo_models.litert`."""
    path = Path(tflite).parent / LITERT_META
    if not path.exists():
        raise UserError(f"{tflite}: no {LITERT_META} beside it, so its preprocessing settings "
                        f"are unknown (write it with python -m pneumo_models.export --litert)")
    return files.read_json(path, "LiteRT metadata")


def chosen_threshold(meta: dict[str, Any]) -> bool:
    """True when an export's threshold was chosen by an evaluation (not the default 0.5)."""
    return meta.get("threshold_source") not in (None, DEFAULT_THRESHOLD_SOURCE)
