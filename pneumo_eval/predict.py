r"""Prediction job: probability and decision for image files, one CSV row each.

    python -m pneumo_eval.predict --model_dir=runs/cnn --input=xrays/ --output=predictions.csv
    python -m pneumo_eval.predict --model_dir=runs/cnn --input=one.jpeg \
        --threshold_from=runs/cnn/eval-test/report.json

Images are decoded the way ingest decodes them (any JPEG/PNG, EXIF
orientation, 16-bit, CMYK; grayscale; stretched to the stored size) and then
resized to the model's input like the pipeline does. A file that cannot be
read gets a row with its error instead of a probability; the job never stops
on one bad file. The CSV is written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from pneumo_data.atomic import replacing
from pneumo_data.flagconfig import option

log = logging.getLogger("pneumo.predict")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


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
        raise FileNotFoundError(f"--input {path} does not exist")
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def _stored_size(config: PredictConfig, model_dir: Path) -> int:
    if config.stored_size:
        return config.stored_size
    try:
        run = json.loads((model_dir / "run.json").read_text())
        manifest = json.loads((Path(run["data_dir"]) / "manifest.json").read_text())
        return int(manifest["image"]["size"])
    except (OSError, KeyError, ValueError):
        return 256


def predict(config: PredictConfig) -> Path:
    import keras
    import tensorflow as tf

    import pneumo_models.models  # noqa: F401  (registers custom layers)
    from pneumo_data.decode import DecodeError, decode_to_gray
    from pneumo_eval.metrics import check_threshold

    if not config.model_dir or not config.input:
        raise ValueError("--model_dir and --input are required")
    model_dir = Path(config.model_dir)
    threshold = config.threshold
    if config.threshold_from:
        report = json.loads(Path(config.threshold_from).read_text())
        threshold = report["threshold"]["value"]
    threshold = check_threshold(threshold)
    files = _files(Path(config.input))
    model = keras.models.load_model(model_dir / "model.keras")
    size = int(model.inputs[0].shape[1])
    stored = _stored_size(config, model_dir)

    rows: list[dict] = []
    batch, owners = [], []

    def flush():
        if not batch:
            return
        pixels = tf.constant(np.stack(batch)[..., None])
        if stored != size:
            pixels = tf.image.resize(pixels, [size, size],
                                     method="area" if size < stored else "bilinear")
            pixels = tf.cast(tf.clip_by_value(tf.round(pixels), 0, 255), tf.uint8)
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
    out = Path(config.output)
    with replacing(out) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "probability", "decision",
                                                    "threshold", "error"])
        writer.writeheader()
        writer.writerows(rows)
    bad = sum(1 for r in rows if r["error"])
    log.info("wrote %s: %d predictions, %d unreadable", out, len(rows) - bad, bad)
    return out



if __name__ == "__main__":
    from pneumo_data.flagconfig import run_job

    run_job("predict", PredictConfig, predict, (ValueError, FileNotFoundError, KeyError))
