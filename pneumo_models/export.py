"""SavedModel export whose serving signature takes encoded JPEG/PNG bytes.

    loaded = tf.saved_model.load("runs/cnn/export")
    probs = loaded.signatures["serving_default"](images=tf.constant([jpeg_bytes]))["probability"]

Each image is decoded as grayscale (any JPEG/PNG/BMP/GIF), resized to the
model's input size (area when shrinking, bilinear when growing, none when it
already fits), rounded to uint8 and fed to the model, which does its own
preprocessing. The output ``probability`` is the pneumonia probability [N].
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import keras
import tensorflow as tf

from pneumo_data.common import files
from pneumo_data.common.errors import UserError


def decode_for_model(data: tf.Tensor, image_size: int) -> tf.Tensor:
    """One encoded image (scalar string) to uint8 [image_size, image_size, 1]."""
    image = tf.io.decode_image(data, channels=1, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 1])
    shape = tf.shape(image)
    size = tf.constant([image_size, image_size])

    def resized():
        shrink = tf.reduce_all(shape[:2] >= size)
        out = tf.cond(shrink,
                      lambda: tf.image.resize(image, size, method="area"),
                      lambda: tf.image.resize(image, size, method="bilinear"))
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    same = tf.reduce_all(tf.equal(shape[:2], size))
    out = tf.cond(same, lambda: image, resized)
    return tf.ensure_shape(out, [image_size, image_size, 1])


class _Serving(tf.Module):
    def __init__(self, model: keras.Model):
        super().__init__()
        self.model = model
        self.image_size = int(model.inputs[0].shape[1])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve(self, images):
        pixels = tf.map_fn(lambda b: decode_for_model(b, self.image_size), images,
                           fn_output_signature=tf.TensorSpec(
                               [self.image_size, self.image_size, 1], tf.uint8))
        probability = self.model(pixels, training=False)
        return {"probability": tf.reshape(tf.cast(probability, tf.float32), [-1])}


@contextlib.contextmanager
def _quiet_saving():
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


def export_serving(model: keras.Model, export_dir: str | os.PathLike, *, out=None) -> Path:
    """Writes the SavedModel to ``export_dir`` (a partial folder, then renamed).

    Inside a job pass its :class:`~pneumo_data.common.outputs.OutputDir` as ``out`` (the
    folder is claimed in its ledger). Without one, an existing ``export_dir`` is replaced only
    when it is a SavedModel (holds ``saved_model.pb``), never another folder.
    """
    export_dir = Path(export_dir)
    module = _Serving(model)
    if out is not None:
        context = out.replacing_dir(export_dir.resolve().relative_to(out.path.resolve()))
    else:
        if (export_dir.exists() and (not export_dir.is_dir() or any(export_dir.iterdir()))
                and not (export_dir / "saved_model.pb").exists()):
            raise UserError(f"{export_dir} exists and is not a SavedModel; not replacing it")
        context = files.replacing_dir(export_dir)
    with context as tmp, _quiet_saving():
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve})
    return export_dir
