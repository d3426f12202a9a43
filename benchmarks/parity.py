r"""Train/serve skew: the pixels and probabilities each route hands a trained model.

    python -m pneumo_models.train --data_dir=runs/data224 --model_dir=runs/cnn
    python -m benchmarks.parity --model_dir=runs/cnn \
        --source_dir=../shared/data/chest_xray_fullres --name=parity-chest_xray_fullres

For every JPEG/PNG under --source_dir (every k-th of the sorted list, at most --limit files),
with the model_dir's ``model.keras`` and the preprocessing settings of its data manifest:

* **before** (the code before ``pneumo_data.preprocess``, reproduced below as reference
  functions): ``predict`` = Pillow decode (Pillow's own two-pass resize, whose pass order
  changed in Pillow 13) + the pipeline's float ``tf.image.resize`` (area/bilinear) + round,
  against the old SavedModel export = ``tf.io.decode_image`` straight to the model size (no
  EXIF orientation, no stored-size step).
* **after**: ``predict`` = :func:`pneumo_data.preprocess.decode` +
  :func:`~pneumo_data.preprocess.model_input_tf.to_model_input`, against
  ``MODEL_DIR/export/saved_model``'s ``serving_default`` signature on the file bytes
  (:mod:`pneumo_models.export`; the threshold plays no part in the probabilities).
* **ingest drift**: the old decode against ``decode`` (would re-preparing change
  the stored images?) and the old pipeline route against the new one (what models trained on
  existing shards see differently now).

Reports the largest and mean absolute probability difference, decisions flipped at
--threshold, and the share of model-input pixels that differ (and by more than one grey
level). Model outputs are deterministic, so one pass suffices; nothing here is timed.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks import common
from pneumo_data.common.files import file_sha256
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.manifest import load_manifest
from pneumo_data.preprocess import decode
from pneumo_models.export_meta import load_serving_meta, model_size
from pneumo_models.rundir import RunDir

flags.DEFINE_string("model_dir", None, "A finished training model_dir (model.keras, run.json).")
flags.DEFINE_string("data_dir", None, "Its prepared data (default: run.json's).")
flags.DEFINE_string("source_dir", None, "Folder of JPEG/PNG images (searched recursively).")
flags.DEFINE_integer("limit", 2000, "At most this many files (every k-th, sorted).")
flags.DEFINE_float("threshold", 0.5, "Decision threshold for counting flips.")
flags.DEFINE_string("output_dir", None, "Results folder (default benchmarks/results).")
flags.DEFINE_string("name", None, "Result file name (default parity-<source folder>).")
FLAGS = flags.FLAGS


# ---------------------------------------------------------------- the code before preprocess

def legacy_decode_to_gray(data: bytes, size: int, fast_jpeg: bool = True) -> np.ndarray:
    """``pneumo_data.decode.decode_to_gray`` before preprocess (stretch mode)."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        if fast_jpeg and image.format == "JPEG":
            image.draft("L", (2 * size, 2 * size))
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.clip(np.asarray(image).astype(np.uint32), 0, 65535) >> 8
        image = Image.fromarray(array.astype(np.uint8), "L")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB").convert("L")
    elif image.mode != "L":
        image = image.convert("L")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), np.uint8)


def legacy_resize(images, size: int):
    """The pipeline's and predict's float resize before preprocess (uint8 [N,S,S,1])."""
    import tensorflow as tf
    stored = images.shape[1]
    if stored == size:
        return np.asarray(images)
    out = tf.image.resize(images, [size, size], method="area" if size < stored else "bilinear")
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8).numpy()


def legacy_export_pixels(data: bytes, size: int) -> np.ndarray:
    """The old SavedModel's ``decode_for_model``: decode_image, then straight to the model."""
    import tensorflow as tf
    image = tf.io.decode_image(data, channels=1, expand_animations=False, dtype=tf.uint8)
    shape = tf.shape(image)
    if bool(tf.reduce_all(tf.equal(shape[:2], [size, size]))):
        return image.numpy()
    method = "area" if bool(tf.reduce_all(shape[:2] >= size)) else "bilinear"
    out = tf.image.resize(image, [size, size], method=method)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8).numpy()


# ---------------------------------------------------------------- measuring

def _files(root: Path, limit: int) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, -(-len(files) // limit))
    return files[::step]


def _probabilities(a: np.ndarray, b: np.ndarray, threshold: float) -> dict:
    d = np.abs(a - b)
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "flipped": int(((a >= threshold) != (b >= threshold)).sum())}


def _pixels(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"differ": float((d > 0).mean()), "differ_by_more_than_1": float((d > 1).mean()),
            "max": int(d.max()),
            "images_changed": int((d > 0).reshape(len(d), -1).any(axis=1).sum())}


def main(argv):
    del argv
    name = FLAGS.name or f"parity-{Path(FLAGS.source_dir).name}"
    common.check_writable(*common.result_paths(name, FLAGS.output_dir))  # before measuring
    tf = import_tensorflow()  # the benchmark's TensorFlow half: loaded here, once
    from pneumo_data.preprocess.model_input_tf import to_model_input
    from pneumo_data.preprocess.stored_tf import decode_stored_tf
    from pneumo_models.models import load_model

    run = RunDir(FLAGS.model_dir)
    model_dir = run.path
    data_dir = FLAGS.data_dir or run.data_dir()
    spec = load_manifest(data_dir).preprocess
    model = load_model(run.model_path)
    size = model_size(model)
    files = _files(Path(FLAGS.source_dir), FLAGS.limit)
    if not files:
        raise app.UsageError(f"no JPEG/PNG files under {FLAGS.source_dir}")
    data = [p.read_bytes() for p in files]
    t = FLAGS.threshold

    def scores(pixels: np.ndarray) -> np.ndarray:
        return model.predict(pixels, verbose=0, batch_size=64)[:, 0].astype(np.float64)

    # before
    old_stored = np.stack([legacy_decode_to_gray(d, spec.stored_size, spec.fast_jpeg)
                           for d in data])[..., None]
    old_predict_px = legacy_resize(old_stored, size)
    old_export_px = np.stack([legacy_export_pixels(d, size) for d in data])
    old_predict, old_export = scores(old_predict_px), scores(old_export_px)
    # after
    new_stored = np.stack([decode(d, spec).pixels for d in data])[..., None]
    new_px = to_model_input(new_stored, size).numpy()
    new_predict = scores(new_px)
    decode_tf = tf.function(lambda d: decode_stored_tf(d, spec),
                            input_signature=[tf.TensorSpec([], tf.string)])
    graph_stored = np.stack([decode_tf(tf.constant(d)).numpy() for d in data])
    saved_model = run.saved_model_path
    if load_serving_meta(saved_model)["model_sha256"] != file_sha256(run.model_path):
        raise app.UsageError(f"{saved_model} is not an export of {run.model_path}; "
                             f"run python -m pneumo_models.export --model_dir={model_dir}")
    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    new_serving = np.concatenate([
        serve(images=tf.constant(data[i:i + 32]))["probability"].numpy()
        for i in range(0, len(data), 32)]).astype(np.float64)

    payload = {
        "environment": common.environment(), "model_dir": str(model_dir),
        "data_dir": str(data_dir), "source_dir": FLAGS.source_dir, "files": len(files),
        "model_size": size, "preprocess": spec.to_dict(), "threshold": t,
        "before": {"probability": _probabilities(old_predict, old_export, t),
                   "model_input_pixels": _pixels(old_predict_px, old_export_px)},
        "after": {"probability": _probabilities(new_predict, new_serving, t),
                  "stored_pixels": _pixels(new_stored, graph_stored),
                  "model_input_pixels": _pixels(new_px, to_model_input(
                      graph_stored, size).numpy())},
        "ingest_drift": {"stored_pixels": _pixels(old_stored, new_stored),
                         "model_input_pixels": _pixels(old_predict_px, new_px),
                         "probability": _probabilities(old_predict, new_predict, t)},
    }
    rows = []
    for label, probability, px in (
            ("before: predict vs old export", payload["before"]["probability"],
             payload["before"]["model_input_pixels"]),
            ("after: predict vs serving_default", payload["after"]["probability"],
             payload["after"]["model_input_pixels"]),
            ("old ingest+pipeline vs new", payload["ingest_drift"]["probability"],
             payload["ingest_drift"]["model_input_pixels"])):
        rows.append([label, f"{probability['max_abs_diff']:.4f}",
                     f"{probability['mean_abs_diff']:.5f}", probability["flipped"],
                     f"{px['differ']:.2%}", f"{px['differ_by_more_than_1']:.2%}"])
    table = common.markdown_table(
        ["routes", "max abs diff", "mean abs diff", f"flips at {t}", "model input pixels differ",
         "by more than 1"], rows)
    drift = payload["ingest_drift"]["stored_pixels"]
    table += (f"\n\n{len(files)} files from `{FLAGS.source_dir}`; stored size "
              f"{spec.stored_size} ({spec.resize}), model input {size}. Re-preparing would "
              f"change the stored image of {drift['images_changed']} files "
              f"({drift['differ']:.3%} of stored pixels, at most {drift['max']} grey levels); "
              f"Pillow and TF stage (a) differ on "
              f"{payload['after']['stored_pixels']['images_changed']} files.")
    common.write_results(name, FLAGS.output_dir, payload, table)


if __name__ == "__main__":
    flags.mark_flags_as_required(["model_dir", "source_dir"])
    common.run(main)
