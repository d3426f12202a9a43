r"""Serving exports of a trained model, built on :mod:`pneumo_data.preprocess`.

    python -m pneumo_models.export --model_dir=runs/cnn \
        --threshold_from=runs/cnn/eval-test/report.json --litert=float32,float16,int8

    loaded = tf.saved_model.load("runs/cnn/export/saved_model")
    out = loaded.signatures["serving_default"](images=tf.constant([jpeg_bytes]))
    out["probability"], out["decision"], out["threshold"]          # each [N]
    loaded.signatures["serve_pixels"](pixels=uint8_images)          # [N, H, W, 1]

The SavedModel has two signatures; both return ``probability`` float32 [N] (pneumonia),
``decision`` string [N] (``pneumonia`` when probability >= threshold, else ``normal``, as
``pneumo_eval.predict`` writes) and ``threshold`` float32 [N]:

* ``serving_default(images: string [N])``: JPEG or PNG file bytes. Stage (a) is
  :func:`pneumo_data.preprocess.decode_stored_tf`, which gives bit for bit the stored image
  ingest wrote for the same file; stage (b) is :func:`~pneumo_data.preprocess.to_model_input`,
  the pipeline's own resize. DICOM, other formats, corrupt files and images over
  ``max_pixels`` fail the call with an InvalidArgumentError that says why (DICOM: decode it
  with pydicom, window it to uint8 and call ``serve_pixels``; pydicom is not wired into the
  graph because a ``tf.py_function`` body is a Python closure that a SavedModel does not
  store, so the signature would fail in TF Serving and in any other process).
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

Where the files go, and who may delete them. Everything lands in ``MODEL_DIR/export/``:
``saved_model/`` and, with ``--litert``, ``litert/`` (one ``.tflite`` per variant and
``litert.json``). ``export/`` is a folder of its own *export* job, with its own ledger
(:class:`~pneumo_data.common.outputs.OutputDir`), claimed in the training job's ledger as a
nested folder, as ``MODEL_DIR/data`` is prepare's. The alternative, writing the exports as
entries of the training job's ledger, would let the export job delete anything the training
run wrote; this way the export job can only ever delete or replace what its own ledger lists
(``saved_model/`` and ``litert/``, each a sealed folder), and a file anyone adds to the
model_dir or to ``export/`` survives both the export job and ``train --overwrite``. The export
job still takes the model_dir's lock (opening it as the training job's folder, changing
nothing there but the one ``export`` claim), so it never reads a ``model.keras`` that a
running training job is rewriting, and a training job never starts while an export runs. The
training job writes the same ``export/saved_model/`` at the end of a run through the same code
(threshold 0.5, recorded as "no threshold chosen yet"). A model_dir trained before this layout
existed holds a SavedModel directly in ``export/``, listed in the training job's ledger; the
export job replaces that folder (only if it holds nothing but what training sealed into it)
by the new layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from pneumo_data import preprocess
from pneumo_data.common import files
from pneumo_data.common.config import option
from pneumo_data.common.errors import UserError
from pneumo_data.common.outputs import LEDGER_NAME, OutputDir

log = logging.getLogger("pneumo.export")

EXPORT_DIR = "export"            # in a model_dir: the export job's folder
SAVED_MODEL_DIR = "saved_model"  # in EXPORT_DIR
LITERT_DIR = "litert"            # in EXPORT_DIR
META_DIR = "assets.extra"        # in the SavedModel (TF Serving's place for extra files)
SERVING_META = "serving.json"
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


# ------------------------------------------------------------------ the SavedModel

def serving_module(model, spec: preprocess.PreprocessSpec, threshold: float):
    """A ``tf.Module`` with the ``serve_bytes`` and ``serve_pixels`` tf.functions."""
    import tensorflow as tf

    size = model_size(model)
    stored = spec.stored_size
    threshold = float(threshold)

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def _outputs(self, images):
            pixels = preprocess.to_model_input(images, size)
            probability = tf.reshape(tf.cast(self.model(pixels, training=False), tf.float32),
                                     [-1])
            cut = tf.fill(tf.shape(probability), tf.constant(threshold, tf.float32))
            decision = tf.where(probability >= cut, DECISIONS[1], DECISIONS[0])
            return {"probability": probability, "decision": decision, "threshold": cut}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serve_bytes(self, images):
            pixels = tf.map_fn(lambda data: preprocess.decode_stored_tf(data, spec), images,
                               fn_output_signature=tf.TensorSpec([stored, stored, 1],
                                                                 tf.uint8))
            return self._outputs(pixels)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.uint8,
                                                    name="pixels")])
        def serve_pixels(self, pixels):
            shape = tf.shape(pixels)
            already = tf.logical_and(tf.equal(shape[1], stored), tf.equal(shape[2], stored))
            images = tf.cond(already, lambda: pixels,
                             lambda: preprocess.resize_stored_tf(pixels[..., 0], spec)[..., None])
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
    import keras
    import PIL
    import tensorflow as tf
    return {"tensorflow": tf.__version__, "keras": keras.__version__, "pillow": PIL.__version__}


def export_saved_model(model, export_dir: str | os.PathLike,
                       spec: preprocess.PreprocessSpec = preprocess.DEFAULT_SPEC,
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
    import tensorflow as tf

    from pneumo_eval.metrics import check_threshold

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


def load_serving_meta(saved_model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``serving.json`` :func:`export_saved_model` wrote into a SavedModel."""
    path = Path(saved_model_dir) / META_DIR / SERVING_META
    if not path.exists():
        raise ExportError(f"{saved_model_dir} has no {META_DIR}/{SERVING_META}: not a SavedModel "
                          f"written by pneumo_models.export")
    return files.read_json(path, "serving metadata")


# ------------------------------------------------------------------ into a model_dir

def _adopt_legacy_export(model_out: OutputDir) -> None:
    """Removes a pre-``export/``-job SavedModel that training sealed directly into export/."""
    folder = model_out.path / EXPORT_DIR
    if (folder / LEDGER_NAME).exists() or not folder.exists():
        return
    if not model_out.owns(EXPORT_DIR):
        raise ExportError(f"{folder} was not written by pneumo; not replacing it. Move it away")
    log.info("replacing %s (a SavedModel written by an earlier version's training job) by "
             "the export job's folder", folder)
    model_out.remove(EXPORT_DIR)


def export_into_model_dir(model_out: OutputDir, model, spec: preprocess.PreprocessSpec, *,
                          threshold: float = 0.5,
                          threshold_source: str = DEFAULT_THRESHOLD_SOURCE,
                          litert: tuple[str, ...] = (), data_dir=None,
                          calibration_images: int = 300, seed: int = 0,
                          model_sha256: str | None = None) -> dict[str, Any]:
    """Writes ``MODEL_DIR/export/saved_model`` (and ``litert/`` when ``litert`` names variants).

    ``model_out`` is the model_dir opened as the training job's OutputDir (the training job's
    own, at the end of a run, or the export job's). ``export/`` is claimed there as the export
    job's nested folder; everything is written through the export job's own ledger. Returns
    what was written.
    """
    _adopt_legacy_export(model_out)
    folder = model_out.nested(EXPORT_DIR, job="export")
    result: dict[str, Any] = {"threshold": threshold, "threshold_source": threshold_source,
                              "preprocess": spec.to_dict()}
    with OutputDir(folder, job="export") as out:
        for name in (SAVED_MODEL_DIR, LITERT_DIR) if litert else (SAVED_MODEL_DIR,):
            out.check_replaceable(name)  # both before either is written
        result["saved_model"] = str(export_saved_model(
            model, folder / SAVED_MODEL_DIR, spec, threshold, threshold_source, out=out,
            model_sha256=model_sha256))
        if litert:
            from pneumo_models import litert as litert_lib
            paths = litert_lib.export_litert(
                model, folder / LITERT_DIR, spec, litert, data_dir=data_dir,
                calibration=calibration_images, seed=seed, out=out, model_sha256=model_sha256)
            result["litert"] = {k: str(v) for k, v in paths.items()}
    return result


# ------------------------------------------------------------------ the job

@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Options of the export job; each field is also a command-line flag."""

    model_dir: str | None = option(None, "A finished training model_dir (model.keras, run.json).")
    threshold: float | None = option(
        None, "Decision threshold the signatures apply (default 0.5; not with --threshold_from).")
    threshold_from: str | None = option(
        None, "A report.json of pneumo_eval.evaluate for this model: the threshold it chose "
              "on val.")
    litert: tuple = option((), "LiteRT variants to write into MODEL_DIR/export/litert: any of "
                               "float32, float16, int8 (the folder is replaced with exactly "
                               "these; empty: litert/ is left as it is).")
    calibration_images: int = option(300, "Images of the train stream that calibrate int8.")
    calibration_seed: int = option(0, "Seed of the calibration sample.")
    data_dir: str | None = option(None, "The prepared data the model was trained on (default: "
                                        "run.json's); gives the preprocessing settings and "
                                        "the int8 calibration images.")


def _threshold(config: ExportConfig) -> tuple[float, str, str | None]:
    """(threshold, where it came from, sha256 of the model file the report evaluated)."""
    from pneumo_eval.metrics import check_threshold

    if config.threshold_from and config.threshold is not None:
        raise ExportError("give --threshold or --threshold_from, not both")
    evaluated = None
    if config.threshold_from:
        report = files.read_json(config.threshold_from, "--threshold_from")
        try:
            chosen = report["threshold"]
            value = chosen["value"]
            evaluated = report["model"]["file_sha256"]
        except (KeyError, TypeError):
            raise ExportError(f"--threshold_from {config.threshold_from} is not a report.json "
                              f"of pneumo_eval.evaluate (no threshold.value or "
                              f"model.file_sha256)") from None
        source = (f"{config.threshold_from}: policy {chosen.get('policy')}, chosen on "
                  f"{chosen.get('chosen_on')}")
    elif config.threshold is not None:
        value, source = config.threshold, "--threshold"
    else:
        value, source = 0.5, DEFAULT_THRESHOLD_SOURCE
    try:
        return check_threshold(value), source, evaluated
    except ValueError as error:
        raise ExportError(f"{source}: {error}") from None


def _check(config: ExportConfig) -> tuple[Path, Path | None]:
    """Checks before anything is written or loaded; returns (model_dir, data_dir)."""
    from pneumo_models.train import run_data_dir

    if not config.model_dir:
        raise ExportError("--model_dir is required")
    unknown = sorted(set(config.litert) - set(VARIANTS))
    if unknown:
        raise ExportError(f"--litert: unknown variant(s) {unknown}; choose from {VARIANTS}")
    if config.calibration_images < 1:
        raise ExportError(f"--calibration_images must be positive, got "
                          f"{config.calibration_images}")
    model_dir = Path(config.model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"--model_dir {model_dir} does not exist")
    for name, why in (("model.keras", "is the training finished?"),
                      ("run.json", "the training has not finished"),
                      (LEDGER_NAME, "it was not written by this version's training job")):
        if not (model_dir / name).is_file():
            raise ExportError(f"{model_dir} has no {name}: {why}")
    run = files.read_json(model_dir / "run.json", "run record")
    data_dir = Path(config.data_dir) if config.data_dir else run_data_dir(model_dir, run)
    return model_dir, data_dir


def export(config: ExportConfig) -> dict[str, Any]:
    """Runs the export job (see the module docstring); returns what it wrote."""
    from pneumo_data import manifest as manifest_lib
    from pneumo_models.models import load_model

    model_dir, data_dir = _check(config)
    threshold, source, evaluated = _threshold(config)
    if data_dir is None:
        raise ExportError(f"{model_dir}/run.json names no data_dir; pass --data_dir (the "
                          f"prepared data the model was trained on)")
    spec = manifest_lib.load_manifest(data_dir).preprocess
    with OutputDir(model_dir, job="train") as model_out:
        if not (model_dir / "run.json").is_file():  # again, under the lock
            raise ExportError(f"{model_dir} has no run.json: the training has not finished")
        sha = files.file_sha256(model_dir / "model.keras")
        if evaluated is not None and evaluated != sha:
            raise ExportError(f"--threshold_from {config.threshold_from} evaluated another "
                              f"model file (sha256 {str(evaluated)[:12]}..., this model.keras "
                              f"is {sha[:12]}...); evaluate this model first")
        model = load_model(model_dir / "model.keras")
        result = export_into_model_dir(
            model_out, model, spec, threshold=threshold, threshold_source=source,
            litert=tuple(config.litert), data_dir=data_dir,
            calibration_images=config.calibration_images, seed=config.calibration_seed,
            model_sha256=sha)
    log.info("exported %s: threshold %.4f (%s); %s", model_dir, threshold, source,
             ", ".join([result["saved_model"], *result.get("litert", {}).values()]))
    return result


if __name__ == "__main__":
    from pneumo_data.common.jobs import run_job

    run_job("export", ExportConfig, export)
