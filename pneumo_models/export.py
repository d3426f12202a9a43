r"""Export job: a finished model_dir's model as a serving SavedModel and LiteRT flatbuffers.

    python -m pneumo_models.export --model_dir=runs/cnn \
        --threshold_from=runs/cnn/eval-test/report.json --litert=float32,float16,int8

    loaded = tf.saved_model.load("runs/cnn/export/saved_model")
    out = loaded.signatures["serving_default"](images=tf.constant([jpeg_bytes]))
    out["probability"], out["decision"], out["threshold"]          # each [N]
    loaded.signatures["serve_pixels"](pixels=uint8_images)          # [N, H, W, 1]

The SavedModel (:mod:`pneumo_models.serving`) and the LiteRT files
(:mod:`pneumo_models.litert`) land in ``MODEL_DIR/export/`` (:mod:`pneumo_models.export_dir`
says who may delete what there). The threshold is fixed at export: ``--threshold_from`` takes
the one an evaluation chose on val (its report must be of this very ``model.keras``: the sha256
is checked, :mod:`pneumo_models.report`), ``--threshold`` a number; without either it is 0.5,
and ``serving.json`` says so. The job holds the model_dir's lock, so it never reads a
``model.keras`` that a running training job is rewriting.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from pneumo_data import manifest as manifest_lib
from pneumo_data.common import files
from pneumo_data.common.config import option
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.common.outputs import LEDGER_NAME, OutputDir
from pneumo_models.export_meta import DEFAULT_THRESHOLD_SOURCE, VARIANTS, ExportError
from pneumo_models.report import ReportError, Threshold, check_threshold, read_threshold
from pneumo_models.rundir import RunDir

log = logging.getLogger("pneumo.export")


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


def _threshold(config: ExportConfig) -> tuple[float, str, Threshold | None]:
    """(threshold, where it came from, the report it came from)."""
    if config.threshold_from and config.threshold is not None:
        raise ExportError("give --threshold or --threshold_from, not both")
    chosen = None
    if config.threshold_from:
        chosen = read_threshold(config.threshold_from)
        value, source = chosen.value, chosen.source
    elif config.threshold is not None:
        value, source = config.threshold, "--threshold"
    else:
        value, source = 0.5, DEFAULT_THRESHOLD_SOURCE
    try:
        return check_threshold(value), source, chosen
    except ValueError as error:
        raise ExportError(f"{source}: {error}") from None


def _check(config: ExportConfig) -> tuple[RunDir, Path | None]:
    """Checks before anything is written or loaded; returns (model_dir, data_dir)."""
    if not config.model_dir:
        raise ExportError("--model_dir is required")
    unknown = sorted(set(config.litert) - set(VARIANTS))
    if unknown:
        raise ExportError(f"--litert: unknown variant(s) {unknown}; choose from {VARIANTS}")
    if config.calibration_images < 1:
        raise ExportError(f"--calibration_images must be positive, got "
                          f"{config.calibration_images}")
    run = RunDir(config.model_dir)
    if not run.path.is_dir():
        raise ExportError(f"--model_dir {run.path} does not exist")
    record = run.require_finished()
    if not (run.path / LEDGER_NAME).is_file():
        raise ExportError(f"{run.path} has no {LEDGER_NAME}: it was not written by this "
                          f"version's training job")
    data_dir = Path(config.data_dir) if config.data_dir else run.data_dir(record)
    return run, data_dir


def export(config: ExportConfig) -> dict[str, Any]:
    """Runs the export job (see the module docstring); returns what it wrote."""
    run, data_dir = _check(config)
    threshold, source, chosen = _threshold(config)
    if data_dir is None:
        raise ExportError(f"{run.path}'s run record names no data_dir; pass --data_dir (the "
                          f"prepared data the model was trained on)")
    m = manifest_lib.load_manifest(data_dir)
    spec = m.preprocess
    with OutputDir(run.path, job="train") as model_out:
        record = run.require_finished()  # again, under the lock
        if run.is_training_data(data_dir, record):  # int8 calibrates on its train split
            run.check_data(m, record, ExportError)
        sha = files.file_sha256(run.model_path)
        if chosen is not None:
            try:
                chosen.check_model(sha)
                chosen.check_run(run, record)
            except ReportError as error:
                raise ExportError(str(error)) from None
        # The job's TensorFlow half, loaded once the checks have passed.
        import_tensorflow()
        from pneumo_models.export_dir import export_into_model_dir
        from pneumo_models.models import load_model

        model = load_model(run.model_path)
        result = export_into_model_dir(
            model_out, model, spec, threshold=threshold, threshold_source=source,
            litert=tuple(config.litert), data_dir=data_dir,
            calibration_images=config.calibration_images, seed=config.calibration_seed,
            model_sha256=sha)
    log.info("exported %s, each carrying the threshold %.4f (%s): %s", run.path, threshold,
             source, ", ".join([result["saved_model"], *result.get("litert", {}).values()]))
    return result


if __name__ == "__main__":
    from pneumo_data.common.jobs import run_job

    run_job("export", ExportConfig, export)
