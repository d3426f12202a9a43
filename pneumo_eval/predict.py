r"""Prediction job: probability and decision for image files, one CSV row each.

    python -m pneumo_eval.predict --model_dir=runs/cnn --input=xrays/ --output=predictions.csv
    python -m pneumo_eval.predict --model_dir=runs/cnn --input=one.jpeg \
        --threshold_from=runs/cnn/eval-test/report.json
    python -m pneumo_eval.predict --model=runs/cnn/export/saved_model --input=xrays/
    python -m pneumo_eval.predict --model=runs/cnn/export/litert/int8.tflite --input=xrays/

``--model`` is a ``.keras`` file, a SavedModel folder written by :mod:`pneumo_models.export` or
a ``.tflite`` file written by :mod:`pneumo_models.litert` (default: ``MODEL_DIR/model.keras``).
Every file is decoded as ingest decodes it: stage (a) of :mod:`pneumo_data.preprocess` (Pillow:
any JPEG/PNG/BMP/TIFF/GIF/WebP, EXIF orientation, 16-bit, CMYK), DICOM (recognised by content)
by :mod:`pneumo_data.preprocess.dicom` (pydicom, grey-level windowing, then the same resize),
with the settings the model's training images were stored with: for a Keras model those of its
data manifest (``run.json`` of ``--model_dir``, or of the folder holding the ``.keras`` file;
``--stored_size``/``--resize`` override), for an export the ones it recorded (``serving.json``,
``litert.json``). Stage (b), the resize to the model's input, is the pipeline's own (inside the
SavedModel and the flatbuffer). So each route sees exactly the pixels the evaluated model saw.

``--tta`` (test-time augmentation, :mod:`pneumo_eval.tta`) averages the probability over
mirrored and rescaled views: for a Keras model the views are made at the model's input size,
as evaluate makes them; an export takes the stored image, so there they are made at the
stored size (the same views, resampled at another size).

The threshold: ``--threshold_from`` (an evaluation's report.json, refused unless it evaluated
this very model file and the data the model was trained on), else ``--threshold``, else the one
an export was given (a SavedModel's ``serving.json``, a LiteRT file's ``litert.json``), else
0.5. A threshold chosen with another ``--tta`` than predict's is used with a warning (it was
chosen on other scores). A file that cannot be read gets a row with its error instead of a
probability; the job never stops on one bad file. The CSV is written under a partial name and
renamed when complete, with a hidden stamp beside it
(:class:`~pneumo_data.common.outputs.OwnedFile`): an existing ``--output`` is replaced only
when it is this job's earlier output, unedited; any other file is refused before any work.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from pneumo_data import manifest as manifest_lib
from pneumo_data.common.files import file_sha256
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.common.outputs import OutputError, OwnedFile
from pneumo_data.preprocess import RESIZE_MODES, DecodeError, PreprocessSpec, decode
from pneumo_eval.config import TTA_MODES, PredictConfig, PredictError
from pneumo_models.edge import LiteRTModel
from pneumo_models.export_meta import (
    LITERT_META,
    load_litert_meta,
    load_serving_meta,
    model_size,
    serving_meta_path,
)
from pneumo_models.report import ReportError, check_threshold, read_threshold
from pneumo_models.rundir import MODEL, RunDir, RunDirError

log = logging.getLogger("pneumo.predict")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm",
                  ".dicom"}
COLUMNS = ("path", "probability", "decision", "threshold", "error")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PredictError(f"--input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise PredictError(f"--input {path} holds no files (searched recursively)")
    return files


def _threshold_from(path: str, model, tta: str = "none") -> float:
    """The threshold of report ``path``, checked against the model it is applied to (its
    file's sha256, and the training data the threshold was chosen on)."""
    chosen = read_threshold(path)
    try:
        chosen.check_model(model.sha256, f"{model.path}'s model file")
        if model.run is not None and model.run.is_complete():
            chosen.check_run(model.run, model.run.record())
    except ReportError as error:
        raise PredictError(str(error)) from None
    if chosen.tta != tta:
        log.warning("the threshold of %s was chosen with --tta=%s, and predict runs --tta=%s: "
                    "it was chosen on other scores", path, chosen.tta, tta)
    return chosen.value


# ---------------------------------------------------------------- the three kinds of model

@dataclasses.dataclass
class Model:
    """What predict knows about a model before loading it (no TensorFlow): its kind, how its
    training images were stored, the model file it is (sha256) and the threshold an export
    carries."""

    kind: str
    path: Path
    spec: PreprocessSpec
    spec_source: str
    sha256: str | None
    threshold: float | None = None  # the exported one (SavedModel, LiteRT)
    run: RunDir | None = None       # the training run of a .keras model, when known


def _model_path(config: PredictConfig) -> Path:
    if config.model:
        path = Path(config.model)
        if not path.exists():
            raise PredictError(f"--model {path} does not exist")
        return path
    if not config.model_dir:
        raise PredictError("--model_dir or --model is required")
    path = RunDir(config.model_dir).model_path
    if not path.exists():
        raise PredictError(f"{config.model_dir} has no {MODEL} (is the training finished?)")
    return path


def _kind(path: Path) -> str:
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return "savedmodel"
        raise PredictError(f"--model {path} is a folder without saved_model.pb: give a .keras "
                           f"file, a SavedModel folder or a .tflite file")
    if path.suffix == ".tflite":
        return "litert"
    if path.suffix == ".keras":
        return "keras"
    raise PredictError(f"--model {path}: expected a .keras file, a SavedModel folder or a "
                       f".tflite file")


def _keras_model(config: PredictConfig, path: Path) -> Model:
    """A .keras model: its settings from overrides, else its run's manifest."""
    spec, source, trained = None, None, None
    candidates = [RunDir(config.model_dir)] if config.model_dir else []
    candidates.append(RunDir(path.parent))
    for run in candidates:
        if not run.is_complete():
            continue
        trained = run
        record = run.record()
        data_dir = run.data_dir(record)
        try:
            m = manifest_lib.load_manifest(data_dir) if data_dir else None
        except manifest_lib.ManifestError as error:
            log.warning("cannot read the training data's manifest: %s", error)
            m = None
        if m is not None:
            try:
                run.check_data(m, record)
            except RunDirError as error:  # the stored-image settings still apply
                log.warning("%s", error)
            spec, source = m.preprocess, f"the manifest of {data_dir}"
            break
    if config.stored_size or config.resize:
        base = spec or PreprocessSpec()
        spec = dataclasses.replace(base, stored_size=config.stored_size or base.stored_size,
                                   resize=config.resize or base.resize)
        source = "--stored_size/--resize" + (f" over {source}" if source else "")
    if spec is None:
        raise PredictError(
            f"cannot tell how {path}'s training images were stored (no finished run with a "
            f"readable data manifest beside it or in --model_dir): pass --stored_size (and "
            f"--resize=pad if they were padded)")
    return Model("keras", path, spec, source, file_sha256(path), run=trained)


def _describe(config: PredictConfig, path: Path, kind: str) -> Model:
    """The model's settings, file identity and exported threshold, read without TensorFlow."""
    if kind != "keras" and (config.stored_size or config.resize):
        raise PredictError("--stored_size/--resize apply to .keras models only; an export "
                           "records its own preprocessing settings")
    if kind == "keras":
        return _keras_model(config, path)
    if kind == "savedmodel":
        meta, source = load_serving_meta(path), f"{serving_meta_path(path)}"
    else:
        meta, source = load_litert_meta(path), f"{path.parent / LITERT_META}"
    threshold = meta.get("threshold")
    return Model(kind, path, PreprocessSpec.from_dict(meta["preprocess"]), source,
                 meta.get("model_sha256"), None if threshold is None else float(threshold))


def _tensorflow_half():
    """The job's TensorFlow half: the Keras and SavedModel routes and test-time augmentation
    import it here, once the checks have passed (a LiteRT model without --tta runs without
    TensorFlow)."""
    tf = import_tensorflow()
    from pneumo_data.preprocess.model_input_tf import to_model_input
    from pneumo_eval.tta import tta_scores
    from pneumo_models.models import load_model, predictor
    return tf, to_model_input, tta_scores, load_model, predictor


def _scores(config: PredictConfig, model: Model) -> Callable[[np.ndarray], np.ndarray]:
    """``probabilities(stored uint8 [N, S, S, 1]) -> float [N]`` of the loaded model."""
    path = model.path
    if model.kind == "keras":
        _, to_model_input, tta_scores, load_model, predictor = _tensorflow_half()
        net = load_model(path)
        size, score = model_size(net), predictor(net)
        return lambda x: tta_scores(score, to_model_input(x, size), config.tta)
    if model.kind == "savedmodel":
        tf, _, tta_scores, _, _ = _tensorflow_half()
        signature = tf.saved_model.load(str(path)).signatures["serve_pixels"]
        return lambda x: tta_scores(lambda v: np.asarray(
            signature(pixels=tf.constant(v))["probability"], np.float64), x, config.tta)
    edge = LiteRTModel(path)
    if model.spec.stored_size != edge.stored_size:
        raise PredictError(f"{path} takes {edge.stored_size} px images but its "
                           f"{LITERT_META} says {model.spec.stored_size}")

    def edge_scores(v):
        return edge.predict(v, batch_size=len(v)).astype(np.float64)

    if config.tta == "none":
        return edge_scores
    _, _, tta_scores, _, _ = _tensorflow_half()
    return lambda x: tta_scores(edge_scores, x, config.tta)


def predict(config: PredictConfig) -> Path:
    """Runs the job; returns the CSV's path. Everything is checked (flags, --output, the
    model's files, the threshold's report) before TensorFlow loads or any image is read."""
    if not config.input:
        raise PredictError("--input is required")
    if config.batch_size < 1 or config.stored_size < 0:
        raise PredictError("--batch_size must be positive and --stored_size >= 0")
    if config.resize is not None and config.resize not in RESIZE_MODES:
        raise PredictError(f"--resize must be one of {RESIZE_MODES}, got {config.resize!r}")
    if config.tta not in TTA_MODES:
        raise PredictError(f"--tta must be one of {TTA_MODES}, got {config.tta!r}")
    out = OwnedFile(config.output, job="predict")
    try:
        out.check()
    except OutputError as error:
        raise PredictError(f"--output: {error}") from None
    if config.threshold is not None and config.threshold_from:
        raise PredictError("give --threshold or --threshold_from, not both")
    if config.threshold is not None:
        try:
            check_threshold(config.threshold)
        except ValueError as error:
            raise PredictError(str(error)) from None
    files = _files(Path(config.input))
    path = _model_path(config)
    model = _describe(config, path, _kind(path))
    threshold = check_threshold(
        _threshold_from(config.threshold_from, model, config.tta) if config.threshold_from
        else config.threshold if config.threshold is not None
        else model.threshold if model.threshold is not None else 0.5)
    spec = model.spec
    probabilities = _scores(config, model)
    log.info("%s model %s; preprocessing %s (from %s); threshold %g", model.kind, path,
             json.dumps(spec.to_dict()), model.spec_source, threshold)

    rows: list[dict] = []
    batch, owners = [], []

    def flush():
        if not batch:
            return
        probs = probabilities(np.stack(batch)[..., None])
        for row, p in zip(owners, probs):
            row.update(probability=f"{p:.6f}", decision="pneumonia" if p >= threshold
                       else "normal")
        batch.clear()
        owners.clear()

    for file in files:
        row = {"path": str(file), "probability": "", "decision": "", "threshold": threshold,
               "error": ""}
        rows.append(row)
        try:
            batch.append(decode(file.read_bytes(), spec).pixels)
            owners.append(row)
        except (DecodeError, OSError) as error:
            row["error"] = str(error)
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                row["error"] += f" (suffix {file.suffix or 'none'})"
        if len(batch) >= config.batch_size:
            flush()
    flush()
    with out.replacing() as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    bad = sum(1 for r in rows if r["error"])
    log.info("wrote %s: %d predictions, %d unreadable", out.path, len(rows) - bad, bad)
    return out.path


if __name__ == "__main__":
    from pneumo_data.common.jobs import run_job

    run_job("predict", PredictConfig, predict)
