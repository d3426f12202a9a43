"""``MODEL_DIR/export/``: the SavedModel and the LiteRT files of a model_dir, and who writes them.

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
(threshold 0.5, recorded as "no threshold chosen yet").
"""

from __future__ import annotations

from typing import Any

from pneumo_data.common.outputs import OutputDir
from pneumo_data.preprocess import PreprocessSpec
from pneumo_models import litert as litert_lib
from pneumo_models.export_meta import DEFAULT_THRESHOLD_SOURCE
from pneumo_models.rundir import EXPORT, LITERT, SAVED_MODEL
from pneumo_models.serving import export_saved_model


def export_into_model_dir(model_out: OutputDir, model, spec: PreprocessSpec, *,
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
    folder = model_out.nested(EXPORT, job="export")
    result: dict[str, Any] = {"threshold": threshold, "threshold_source": threshold_source,
                              "preprocess": spec.to_dict()}
    with OutputDir(folder, job="export") as out:
        for name in (SAVED_MODEL, LITERT) if litert else (SAVED_MODEL,):
            out.check_replaceable(name)  # both before either is written
        result["saved_model"] = str(export_saved_model(
            model, folder / SAVED_MODEL, spec, threshold, threshold_source, out=out,
            model_sha256=model_sha256))
        if litert:
            paths = litert_lib.export_litert(
                model, folder / LITERT, spec, litert, data_dir=data_dir,
                calibration=calibration_images, seed=seed, out=out, model_sha256=model_sha256,
                threshold=threshold, threshold_source=threshold_source)
            result["litert"] = {k: str(v) for k, v in paths.items()}
    return result
