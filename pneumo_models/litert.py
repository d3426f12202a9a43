"""LiteRT (TensorFlow Lite) flatbuffers for devices, on :mod:`pneumo_data.preprocess`.

    python -m pneumo_models.export --model_dir=runs/cnn --litert=float32,float16,int8

(:class:`pneumo_models.edge.LiteRTModel` runs them.)

Each flatbuffer takes the *stored* image, uint8 ``[N, S, S, 1]`` (batch 1 in the file;
:class:`~pneumo_models.edge.LiteRTModel` resizes the batch dimension), i.e. what stage (a) of
:mod:`pneumo_data.preprocess` makes of a file (``decode``; on a device, the same
Pillow code or any decoder plus the recorded settings). Inside: stage (b) (int32
GATHER/MUL/SUM, exact, the same bits as the pipeline), the model's own ``Preprocess`` layer and
the network; the output is the pneumonia probability, float32 ``[N]``. The augmentation layer
is called with ``training=False`` and leaves no op behind. ``litert.json`` beside the files
records the preprocessing settings and the decision threshold the export was given (the one
the SavedModel carries; ``predict --model=X.tflite`` applies it).

Variants:

* ``float32``: the weights as trained.
* ``float16``: weights stored as float16 (half the file), computed in float32.
* ``int8``: full-integer post-training quantization (weights and activations int8, int32
  biases), calibrated on images of the pipeline's *train* stream
  (:func:`calibration_images`: ``pneumo_data.train_dataset`` without augmentation, which opens
  the train split's shards only; ``litert.json`` lists them). The uint8 input and the integer
  stage (b) are not quantized; the output is dequantized to float32.

The converter is TensorFlow's ``tf.lite.TFLiteConverter`` (still shipped in TF 2.21):
``from_concrete_functions`` on the model called inside a ``tf.function``, after freezing its
variables into constants (otherwise the flatbuffer keeps READ_VARIABLE ops that the int8
calibrator cannot run). LiteRT has no bfloat16 kernels, so a model trained under
``mixed_bfloat16`` is first rebuilt in float32 with the same weights (:func:`float32_copy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from pneumo_data import manifest as manifest_lib
from pneumo_data import reader
from pneumo_data.common import files
from pneumo_data.common.jobs import filtered_stderr
from pneumo_data.preprocess import PreprocessSpec
from pneumo_data.preprocess.model_input_tf import to_model_input
from pneumo_models import models  # noqa: F401  (registers the custom layers for float32_copy)
from pneumo_models.export_meta import (
    DEFAULT_THRESHOLD_SOURCE,
    LITERT_META,
    VARIANTS,
    ExportError,
    model_size,
)
from pneumo_models.report import check_threshold
from pneumo_models.serving import quiet_saving, replacing_folder, versions

log = logging.getLogger("pneumo.litert")


def float32_copy(model):
    """The same network with every layer's dtype policy set to float32, same weights.

    Returns ``model`` itself when it already computes in float32.
    """
    def visit(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") in ("DTypePolicy", "DTypePolicyMap"):
                return {**obj, "config": {**obj.get("config", {}), "name": "float32"}}
            return {key: visit(value) for key, value in obj.items()}
        if isinstance(obj, list):
            return [visit(value) for value in obj]
        return obj

    if all(getattr(layer, "dtype_policy", None) is None
           or layer.dtype_policy.name == "float32" for layer in _all_layers(model)):
        return model
    copy = keras.Model.from_config(visit(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def edge_module(model, stored_size: int):
    """A ``tf.Module`` whose ``serve`` maps uint8 ``[N, S, S, 1]`` to probability [N]."""
    size = model_size(model)

    class Edge(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, stored_size, stored_size, 1],
                                                    tf.uint8, name="image")])
        def serve(self, image):
            pixels = to_model_input(image, size)
            probability = self.model(pixels, training=False)
            return {"probability": tf.reshape(tf.cast(probability, tf.float32), [-1])}

    return Edge()


def convert(model, stored_size: int, variant: str,
            representative: Iterable[np.ndarray] | None = None) -> bytes:
    """One flatbuffer (bytes) of ``model`` with stage (b) inside.

    Args:
      model: a pneumo Keras model (uint8 [M, M, 1] input); bf16 models are copied to float32.
      stored_size: S, the side of the images the flatbuffer takes.
      variant: one of ``float32``, ``float16``, ``int8``.
      representative: for ``int8``, uint8 ``[S, S, 1]`` images to calibrate on.
    """
    if variant not in VARIANTS:
        raise ExportError(f"variant must be one of {VARIANTS}, got {variant!r}")
    module = edge_module(float32_copy(model), stored_size)
    # Keras 3 weights stay resource variables unless frozen into constants here.
    function = convert_variables_to_constants_v2(module.serve.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], module)
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        images = [np.asarray(i, np.uint8).reshape(1, stored_size, stored_size, 1)
                  for i in (representative if representative is not None else [])]
        if not images:
            raise ExportError("int8 needs calibration images")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([i] for i in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with _quiet_converter():
        return converter.convert()


@contextlib.contextmanager
def _quiet_converter():
    """The converter saves a temporary SavedModel (absl INFO lines) and its calibrator prints
    a ``fully_quantize: ...`` line straight to the stderr file descriptor; keep warnings and
    anything else."""
    with quiet_saving(), filtered_stderr(lambda line: line.startswith("fully_quantize:")):
        yield


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What the int8 calibration read: the images and where they came from."""

    images: np.ndarray              # uint8 [n, S, S, 1]
    split: str
    shard_files: tuple[str, ...]    # names inside data_dir
    seed: int

    def provenance(self) -> dict[str, Any]:
        return {"split": self.split, "images": int(len(self.images)), "seed": self.seed,
                "shard_files": list(self.shard_files),
                "stream": "pneumo_data.train_dataset(augment='none', cache=False, "
                          "deterministic=True): the rebalanced train stream, unaugmented"}


def calibration_images(data_dir, stored_size: int, count: int = 300, seed: int = 0
                       ) -> Calibration:
    """``count`` images of the pipeline's train stream at the stored size (no augmentation).

    Only the train split's shards are opened (``Calibration.shard_files``): the val and test
    images never reach the quantizer.
    """
    if count < 1:
        raise ExportError(f"calibration needs at least one image, got {count}")
    m = manifest_lib.load_manifest(data_dir)
    if m.image_size != stored_size:
        raise ExportError(f"{data_dir} stores {m.image_size} px images, the model takes "
                          f"{stored_size} px stored images")
    names = tuple(e["file"] for label in m.classes for e in m.shard_entries("train", label))
    batch = min(count, 64)
    ds = reader.train_dataset(data_dir, batch_size=batch, image_size=stored_size,
                              augment="none", cache=False, seed=seed, deterministic=True)
    images = [pixels.numpy() for pixels, _ in ds.take(-(-count // batch))]
    return Calibration(np.concatenate(images)[:count], "train", names, seed)


def export_litert(model, out_dir: str | os.PathLike, spec: PreprocessSpec,
                  variants: Iterable[str] = VARIANTS, *, data_dir=None, calibration: int = 300,
                  seed: int = 0, out=None, model_sha256: str | None = None,
                  threshold: float = 0.5, threshold_source: str = DEFAULT_THRESHOLD_SOURCE
                  ) -> dict[str, Path]:
    """Writes ``<variant>.tflite`` files and ``litert.json`` as the folder ``out_dir``.

    The folder is replaced whole (a partial folder, then renamed), so it holds exactly
    ``variants``. ``data_dir`` (the prepared data the model was trained on) is required for
    int8. ``out``: the job's OutputDir holding ``out_dir`` (see
    :func:`pneumo_models.serving.replacing_folder`).
    """
    variants = list(dict.fromkeys(variants))
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ExportError(f"LiteRT variants must be some of {VARIANTS}, got {variants}")
    out_dir = Path(out_dir)
    meta: dict[str, Any] = {
        "format": "pneumo-litert", "format_version": 1, "model": model.name,
        "model_sha256": model_sha256, "model_size": model_size(model),
        "preprocess": spec.to_dict(),
        "input": {"name": "image", "dtype": "uint8",
                  "shape": [1, spec.stored_size, spec.stored_size, 1],
                  "what": "the stored image: pneumo_data.preprocess.decode(file, spec).pixels; "
                          "batch dimension resizable"},
        "output": {"name": "probability", "dtype": "float32", "shape": [1]},
        "threshold": check_threshold(threshold), "threshold_source": threshold_source,
        "variants": {}, "versions": versions(),
    }
    calib = None
    if "int8" in variants:
        if data_dir is None:
            raise ExportError("the int8 variant needs data_dir (calibration on the train split)")
        calib = calibration_images(data_dir, spec.stored_size, calibration, seed)
        meta["calibration"] = {"data_dir": str(data_dir), **calib.provenance()}
    paths = {}
    with replacing_folder(out_dir, out, LITERT_META) as tmp:
        for variant in variants:
            start = time.perf_counter()
            flatbuffer = convert(model, spec.stored_size, variant,
                                 calib.images if variant == "int8" else None)
            (tmp / f"{variant}.tflite").write_bytes(flatbuffer)
            paths[variant] = out_dir / f"{variant}.tflite"
            meta["variants"][variant] = {"file": f"{variant}.tflite", "bytes": len(flatbuffer),
                                         "convert_seconds": round(time.perf_counter() - start, 1)}
            log.info("converted %s (%.2f MB)", paths[variant], len(flatbuffer) / 1e6)
        files.write_json(tmp / LITERT_META, meta)
    return paths
