r"""The serving SavedModel of a trained model, built on :mod:`pneumo_data.preprocess` (the
export job, :mod:`pneumo_models.export`, shows how to write and call it).

The SavedModel has two signatures; both return ``probability`` float32 [N] (pneumonia),
``decision`` string [N] (``pneumonia`` when probability >= threshold, else ``normal``, as
``pneumo_eval.predict`` writes) and ``threshold`` float32 [N]:

* ``serving_default(images: string [N])``: JPEG or PNG file bytes. Stage (a) is
  :func:`pneumo_data.preprocess.stored_tf.decode_stored_tf`, which gives bit for bit the
  stored image ingest wrote for the same file; stage (b) is
  :func:`~pneumo_data.preprocess.model_input_tf.to_model_input`, the pipeline's own resize.
  DICOM, other formats, corrupt files and images over ``max_pixels`` fail the call with an
  InvalidArgumentError that says why (DICOM: decode it with pydicom, window it to uint8 and
  call ``serve_pixels``; pydicom is not wired into the graph because a ``tf.py_function``
  body is a Python closure that a SavedModel does not store, so the signature would fail in
  TF Serving and in any other process).
* ``serve_pixels(pixels: uint8 [N, H, W, 1])``: decoded grayscale images, all of one size.
  At the stored size S they go straight to stage (b); any other size first gets stage (a)'s
  resize (``stretch`` or ``pad``, as the data was stored).

The threshold is fixed at export: ``--threshold_from`` takes the one an evaluation chose on
val (its report must be of this very ``model.keras``: the sha256 is checked), ``--threshold``
a number; without either it is 0.5, and ``serving.json`` says so. The model runs with the
numerics it was evaluated with (a mixed_bfloat16 model stays bf16 here; the LiteRT variants of
:mod:`pneumo_models.litert` are float32 copies). ``assets.extra/serving.json`` records the
preprocessing settings, the threshold and where it came from, the model file's sha256 and the
software versions.

The job that writes it (with a threshold, and the LiteRT files) is
:mod:`pneumo_models.export`; the folder layout is :mod:`pneumo_models.export_dir`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import keras
import PIL
import tensorflow as tf

from pneumo_data.common import files
from pneumo_data.common.outputs import OutputDir
from pneumo_data.preprocess import DEFAULT_SPEC, PreprocessSpec
from pneumo_data.preprocess.model_input_tf import to_model_input
from pneumo_data.preprocess.stored_tf import decode_stored_tf, resize_stored_tf
from pneumo_models.export_meta import (
    DECISIONS,
    DEFAULT_THRESHOLD_SOURCE,
    META_DIR,
    SERVING_META,
    ExportError,
    model_size,
)
from pneumo_models.report import check_threshold

log = logging.getLogger("pneumo.export")


def serving_module(model, spec: PreprocessSpec, threshold: float):
    """A ``tf.Module`` with the ``serve_bytes`` and ``serve_pixels`` tf.functions."""
    size = model_size(model)
    stored = spec.stored_size
    threshold = float(threshold)

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def _outputs(self, images):
            pixels = to_model_input(images, size)
            probability = tf.reshape(tf.cast(self.model(pixels, training=False), tf.float32),
                                     [-1])
            cut = tf.fill(tf.shape(probability), tf.constant(threshold, tf.float32))
            decision = tf.where(probability >= cut, DECISIONS[1], DECISIONS[0])
            return {"probability": probability, "decision": decision, "threshold": cut}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serve_bytes(self, images):
            pixels = tf.map_fn(lambda data: decode_stored_tf(data, spec), images,
                               fn_output_signature=tf.TensorSpec([stored, stored, 1],
                                                                 tf.uint8))
            return self._outputs(pixels)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.uint8,
                                                    name="pixels")])
        def serve_pixels(self, pixels):
            shape = tf.shape(pixels)
            already = tf.logical_and(tf.equal(shape[1], stored), tf.equal(shape[2], stored))
            images = tf.cond(already, lambda: pixels,
                             lambda: resize_stored_tf(pixels[..., 0], spec)[..., None])
            return self._outputs(tf.ensure_shape(images, [None, stored, stored, 1]))

    return Serving()


@contextlib.contextmanager
def quiet_saving():
    """``tf.saved_model.save`` turns absl's log level to INFO and logs its sharding and
    fingerprint steps; keep those out of the job's output (warnings still pass)."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level

    def warnings_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING

    absl_logger.addFilter(warnings_only)
    try:
        yield
    finally:
        absl_logger.removeFilter(warnings_only)
        absl_logger.setLevel(level)


@contextlib.contextmanager
def replacing_folder(path: Path, out: OutputDir | None, marker: str) -> Iterator[Path]:
    """Yields an empty partial folder that replaces ``path`` on success.

    With ``out`` (the job's OutputDir holding ``path``), through its ledger. Without one, an
    existing ``path`` is replaced only when it holds ``marker`` (a file an earlier export
    wrote there), never another folder.
    """
    path = Path(path)
    if out is not None:
        with out.replacing_dir(path.resolve().relative_to(out.path.resolve())) as tmp:
            yield tmp
        return
    if (path.exists() and (not path.is_dir() or any(path.iterdir()))
            and not (path / marker).exists()):
        raise ExportError(f"{path} exists and is not a pneumo export; not replacing it")
    with files.replacing_dir(path) as tmp:
        yield tmp


def versions() -> dict[str, str]:
    return {"tensorflow": tf.__version__, "keras": keras.__version__, "pillow": PIL.__version__}


def export_saved_model(model, export_dir: str | os.PathLike,
                       spec: PreprocessSpec = DEFAULT_SPEC,
                       threshold: float = 0.5, threshold_source: str = DEFAULT_THRESHOLD_SOURCE,
                       *, out: OutputDir | None = None, model_sha256: str | None = None) -> Path:
    """Writes the serving SavedModel to ``export_dir`` (a partial folder, then renamed).

    Args:
      model: a pneumo Keras model (uint8 ``[M, M, 1]`` input, probability output).
      export_dir: the SavedModel folder.
      spec: how the model's training images were stored (the data manifest's
        ``preprocess``); the bytes signature decodes with it.
      threshold: the decision threshold both signatures apply.
      threshold_source: where it came from (recorded in ``serving.json``).
      out: inside a job, its OutputDir holding ``export_dir`` (the folder is claimed and
        sealed in its ledger). Without one an existing ``export_dir`` is replaced only when
        it is a pneumo SavedModel export.
      model_sha256: sha256 of the model file, recorded.
    """
    try:
        threshold = check_threshold(threshold)
    except ValueError as error:
        raise ExportError(str(error)) from None
    export_dir = Path(export_dir)
    module = serving_module(model, spec, threshold)
    meta = {
        "format": "pneumo-serving", "format_version": 1, "model": model.name,
        "model_sha256": model_sha256, "model_size": model_size(model),
        "preprocess": spec.to_dict(), "threshold": threshold,
        "threshold_source": threshold_source,
        "signatures": {
            "serving_default": {"inputs": {"images": "string [N]: JPEG or PNG file bytes"}},
            "serve_pixels": {"inputs": {"pixels": "uint8 [N, H, W, 1]: decoded grayscale"}},
            "outputs": {"probability": "float32 [N]", "decision": "string [N] normal|pneumonia",
                        "threshold": "float32 [N]"},
        },
        "versions": versions(),
    }
    with replacing_folder(export_dir, out, f"{META_DIR}/{SERVING_META}") as tmp, quiet_saving():
        tf.saved_model.save(module, str(tmp), signatures={
            "serving_default": module.serve_bytes, "serve_pixels": module.serve_pixels})
        files.write_json(tmp / META_DIR / SERVING_META, meta)
    return export_dir

