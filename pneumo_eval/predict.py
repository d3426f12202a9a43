r"""Prediction job: probability and decision for image files, one CSV row each.

    python -m pneumo_eval.predict --model_dir=runs/cnn --input=xrays/ --output=predictions.csv
    python -m pneumo_eval.predict --model_dir=runs/cnn --input=one.jpeg \
        --threshold_from=runs/cnn/eval-test/report.json

Images are decoded the way ingest decodes them (any JPEG/PNG, EXIF
orientation, 16-bit, CMYK; grayscale; stretched to the stored size) and then
resized to the model's input like the pipeline does. A file that cannot be
read gets a row with its error instead of a probability; the job never stops
on one bad file. The CSV is written under a partial name and renamed when
complete. An existing ``--output`` is replaced only when it is an earlier
predictions CSV of this job (same header); any other file is refused before
any work is done.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from pneumo_data.common.config import option
from pneumo_data.common.errors import UserError
from pneumo_data.common.files import read_json, replacing

log = logging.getLogger("pneumo.predict")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
COLUMNS = ("path", "probability", "decision", "threshold", "error")


class PredictError(UserError):
    """The job cannot run with these inputs; the message says why."""


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    model_dir: str | None = option(None, "A training model_dir (its model.keras is used).")
    input: str | None = option(None, "An image file or a folder (searched recursively).")
    output: str = option("predictions.csv", "CSV to write.")
    threshold: float = option(0.5, "Decision threshold (ignored with --threshold_from).")
    threshold_from: str | None = option(None, "A report.json from pneumo_eval.evaluate whose "
                                              "chosen threshold to use.")
    stored_size: int = option(0, "Size the images were stored at in training (0: from the "
                                 "model's data manifest, else 256).")
    batch_size: int = option(32, "Prediction batch size.")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PredictError(f"--input {path} does not exist")
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def _stored_size(config: PredictConfig, model_dir: Path) -> int:
    from pneumo_models.train import run_data_dir
    if config.stored_size:
        return config.stored_size
    try:
        run = json.loads((model_dir / "run.json").read_text())
        manifest = json.loads((run_data_dir(model_dir, run) / "manifest.json").read_text())
        return int(manifest["image"]["size"])
    except (OSError, KeyError, ValueError, TypeError):
        log.warning("the stored size of %s's training data is unknown; using 256 "
                    "(set --stored_size)", model_dir)
        return 256


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


def _threshold_from(path: str) -> float:
    report = read_json(path, "--threshold_from")
    try:
        return report["threshold"]["value"]
    except (KeyError, TypeError):
        raise PredictError(f"--threshold_from {path} is not a report.json of "
                           f"pneumo_eval.evaluate (no threshold.value)") from None


def predict(config: PredictConfig) -> Path:
    from pneumo_data.decode import DecodeError, decode_to_gray
    from pneumo_data.preprocess import to_model_input
    from pneumo_eval.metrics import check_threshold
    from pneumo_models.models import load_model

    if not config.model_dir or not config.input:
        raise PredictError("--model_dir and --input are required")
    if config.batch_size < 1 or config.stored_size < 0:
        raise PredictError("--batch_size must be positive and --stored_size >= 0")
    model_dir = Path(config.model_dir)
    out = Path(config.output)
    _check_output(out)
    threshold = _threshold_from(config.threshold_from) if config.threshold_from \
        else config.threshold
    try:
        threshold = check_threshold(threshold)
    except ValueError as error:
        raise PredictError(str(error)) from None
    files = _files(Path(config.input))
    if not (model_dir / "model.keras").exists():
        raise PredictError(f"{model_dir} has no model.keras (is the training finished?)")
    model = load_model(model_dir / "model.keras")
    size = int(model.inputs[0].shape[1])
    stored = _stored_size(config, model_dir)

    rows: list[dict] = []
    batch, owners = [], []

    def flush():
        if not batch:
            return
        pixels = to_model_input(np.stack(batch)[..., None], size)
        probs = np.asarray(model(pixels, training=False), np.float64)[:, 0]
        for row, p in zip(owners, probs):
            row.update(probability=f"{p:.6f}", decision="pneumonia" if p >= threshold
                       else "normal")
        batch.clear()
        owners.clear()

    for path in files:
        row = {"path": str(path), "probability": "", "decision": "", "threshold": threshold,
               "error": ""}
        rows.append(row)
        try:
            batch.append(decode_to_gray(path.read_bytes(), stored))
            owners.append(row)
        except (DecodeError, OSError) as error:
            row["error"] = str(error)
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                row["error"] += f" (suffix {path.suffix or 'none'})"
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
