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

The threshold: ``--threshold_from`` (an evaluation's report.json), else ``--threshold``, else
the one a SavedModel was exported with, else 0.5. A threshold chosen with another ``--tta``
than predict's is used with a warning (it was chosen on other scores). A file that cannot be
read gets a row with its error instead of a probability; the job never stops on one bad file.
The CSV is written under a partial name and renamed when complete. An existing ``--output`` is
replaced only when it is an earlier predictions CSV of this job (same header); any other file
is refused before any work is done.
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
from pneumo_data.common.files import replacing
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.preprocess import RESIZE_MODES, DecodeError, PreprocessSpec, decode
from pneumo_eval.config import TTA_MODES, PredictConfig, PredictError
from pneumo_models.edge import LiteRTModel
from pneumo_models.export_meta import LITERT_META, load_litert_meta, load_serving_meta, model_size
from pneumo_models.report import check_threshold, read_threshold
from pneumo_models.rundir import MODEL, RunDir

log = logging.getLogger("pneumo.predict")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm",
                  ".dicom"}
COLUMNS = ("path", "probability", "decision", "threshold", "error")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PredictError(f"--input {path} does not exist")
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def _check_output(out: Path) -> None:
    """Refuses an --output that is a folder, or a file this job did not write."""
    if out.is_dir():
        raise PredictError(f"--output {out} is a folder; give a CSV file path")
    if out.exists():
        with open(out, newline="", errors="replace") as handle:
            header = handle.readline().strip()
        if header != ",".join(COLUMNS):
            raise PredictError(f"--output {out} exists and is not a predictions CSV of this "
                               f"job; not replacing it. Choose another --output")


def _threshold_from(path: str, tta: str = "none") -> float:
    chosen = read_threshold(path)
    if chosen.tta != tta:
        log.warning("the threshold of %s was chosen with --tta=%s, and predict runs --tta=%s: "
                    "it was chosen on other scores", path, chosen.tta, tta)
    return chosen.value


# ---------------------------------------------------------------- the three kinds of model

@dataclasses.dataclass
class Scorer:
    """A loaded model: ``probabilities(stored uint8 [N, S, S, 1]) -> float [N]``."""

    kind: str
    path: Path
    spec: object  # pneumo_data.preprocess.PreprocessSpec
    spec_source: str
    probabilities: Callable[[np.ndarray], np.ndarray]
    threshold: float | None = None  # the exported one (SavedModel)


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


def _keras_spec(config: PredictConfig, path: Path):
    """(spec, where it came from) for a .keras model: overrides, else its run's manifest."""
    spec, source = None, None
    candidates = [RunDir(config.model_dir)] if config.model_dir else []
    candidates.append(RunDir(path.parent))
    for run in candidates:
        if not run.is_complete():
            continue
        data_dir = run.data_dir()
        try:
            spec = manifest_lib.load_manifest(data_dir).preprocess if data_dir else None
        except manifest_lib.ManifestError as error:
            log.warning("cannot read the training data's manifest: %s", error)
            spec = None
        if spec is not None:
            source = f"the manifest of {data_dir}"
            break
    if config.stored_size or config.resize:
        base = spec or PreprocessSpec()
        spec = dataclasses.replace(base, stored_size=config.stored_size or base.stored_size,
                                   resize=config.resize or base.resize)
        source = "--stored_size/--resize" + (f" over {source}" if source else "")
    if spec is None:
        raise PredictError(
            f"cannot tell how {path}'s training images were stored (no run.json with a readable "
            f"data manifest beside it or in --model_dir): pass --stored_size (and --resize=pad "
            f"if they were padded)")
    return spec, source


def _tensorflow_half():
    """The job's TensorFlow half: the Keras and SavedModel routes and test-time augmentation
    import it here, once the checks have passed (a LiteRT model without --tta runs without
    TensorFlow)."""
    tf = import_tensorflow()
    from pneumo_data.preprocess.model_input_tf import to_model_input
    from pneumo_eval.tta import tta_scores
    from pneumo_models.models import load_model, predictor
    return tf, to_model_input, tta_scores, load_model, predictor


def _load(config: PredictConfig, path: Path, kind: str) -> Scorer:
    if kind != "keras" and (config.stored_size or config.resize):
        raise PredictError("--stored_size/--resize apply to .keras models only; an export "
                           "records its own preprocessing settings")
    if kind == "keras":
        spec, source = _keras_spec(config, path)
        _, to_model_input, tta_scores, load_model, predictor = _tensorflow_half()
        model = load_model(path)
        size, score = model_size(model), predictor(model)
        return Scorer(kind, path, spec, source,
                      lambda x: tta_scores(score, to_model_input(x, size), config.tta))
    if kind == "savedmodel":
        meta = load_serving_meta(path)
        tf, _, tta_scores, _, _ = _tensorflow_half()
        signature = tf.saved_model.load(str(path)).signatures["serve_pixels"]
        return Scorer(kind, path, PreprocessSpec.from_dict(meta["preprocess"]),
                      f"{path}'s serving.json", lambda x: tta_scores(lambda v: np.asarray(
                          signature(pixels=tf.constant(v))["probability"], np.float64), x,
                          config.tta),
                      threshold=float(meta["threshold"]))
    meta = load_litert_meta(path)
    edge = LiteRTModel(path)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    if spec.stored_size != edge.stored_size:
        raise PredictError(f"{path} takes {edge.stored_size} px images but its "
                           f"{LITERT_META} says {spec.stored_size}")

    def edge_scores(v):
        return edge.predict(v, batch_size=len(v)).astype(np.float64)

    if config.tta == "none":
        return Scorer(kind, path, spec, f"{path.parent / LITERT_META}", edge_scores)
    _, _, tta_scores, _, _ = _tensorflow_half()
    return Scorer(kind, path, spec, f"{path.parent / LITERT_META}",
                  lambda x: tta_scores(edge_scores, x, config.tta))


def predict(config: PredictConfig) -> Path:
    if not config.input:
        raise PredictError("--input is required")
    if config.batch_size < 1 or config.stored_size < 0:
        raise PredictError("--batch_size must be positive and --stored_size >= 0")
    if config.resize is not None and config.resize not in RESIZE_MODES:
        raise PredictError(f"--resize must be one of {RESIZE_MODES}, got {config.resize!r}")
    out = Path(config.output)
    _check_output(out)
    if config.tta not in TTA_MODES:
        raise PredictError(f"--tta must be one of {TTA_MODES}, got {config.tta!r}")
    given = _threshold_from(config.threshold_from, config.tta) if config.threshold_from \
        else config.threshold
    if given is not None:
        try:
            check_threshold(given)
        except ValueError as error:
            raise PredictError(str(error)) from None
    files = _files(Path(config.input))
    path = _model_path(config)
    scorer = _load(config, path, _kind(path))
    threshold = check_threshold(given if given is not None else
                                scorer.threshold if scorer.threshold is not None else 0.5)
    spec = scorer.spec
    log.info("%s model %s; preprocessing %s (from %s); threshold %g", scorer.kind, path,
             json.dumps(spec.to_dict()), scorer.spec_source, threshold)

    rows: list[dict] = []
    batch, owners = [], []

    def flush():
        if not batch:
            return
        probs = scorer.probabilities(np.stack(batch)[..., None])
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
    with replacing(out) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    bad = sum(1 for r in rows if r["error"])
    log.info("wrote %s: %d predictions, %d unreadable", out, len(rows) - bad, bad)
    return out


if __name__ == "__main__":
    from pneumo_data.common.jobs import run_job

    run_job("predict", PredictConfig, predict)
