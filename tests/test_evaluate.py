import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumo_eval import evaluate as ev
from pneumo_eval.metrics import binary_metrics
from pneumo_eval.predict import PredictConfig, predict
from pneumo_eval.thresholds import choose_threshold
from pneumo_models.train import TrainConfig, train

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def model_dirs(prepared, tmp_path_factory):
    dirs = []
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"model{seed}")
        train(TrainConfig(data_dir=str(prepared), model_dir=str(out), image_size=32,
                          batch_size=16, epochs=2, precision="float32", seed=seed,
                          early_stopping_patience=0))
        dirs.append(out)
    return dirs


def config(dirs, out, **kw):
    base = dict(model_dir=tuple(str(d) for d in dirs), output_dir=str(out), bootstrap=50,
                gradcam_examples=1)
    base.update(kw)
    return ev.EvaluateConfig(**base)


def test_report_threshold_from_val_applied_to_test(model_dirs, prepared, tmp_path):
    (report,) = ev.evaluate(config(model_dirs[:1], tmp_path, threshold_policy="youden"))
    import keras
    import pneumo_models.models  # noqa: F401
    model = keras.models.load_model(model_dirs[0] / "model.keras")
    val = ev.predict_split(model, prepared, "val", 64)
    test = ev.predict_split(model, prepared, "test", 64)
    chosen = choose_threshold(val.labels, val.scores, "youden")
    assert report["threshold"]["value"] == pytest.approx(chosen.threshold)
    assert report["threshold"]["chosen_on"] == "val" and report["threshold"]["policy"] == "youden"
    expected = binary_metrics(test.labels, test.scores, chosen.threshold)
    assert report["counts"] == {k: expected[k] for k in ("tn", "fp", "fn", "tp")}
    assert report["metrics"]["roc_auc"]["estimate"] == pytest.approx(expected["roc_auc"])
    for key, entry in report["metrics"].items():
        if entry["estimate"] is not None:
            assert entry["low"] <= entry["estimate"] <= entry["high"], key
    assert report["bootstrap"]["unit"] == "patient"
    assert set(report["subtype_sensitivity"]) <= {"bacterial", "viral", "unknown"}
    assert report["model"]["file_sha256"] and report["data"]["manifest_sha256"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["threshold"] == report["threshold"]
    assert "# Evaluation" in (tmp_path / "report.md").read_text()
    for name in report["figures"].values():
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.format == "PNG"
    assert {"confusion_matrix", "roc", "pr", "calibration", "histogram"} <= set(report["figures"])


def test_several_models_give_a_comparison(model_dirs, tmp_path):
    reports = ev.evaluate(config(model_dirs, tmp_path, threshold_policy="sensitivity:0.9",
                                 gradcam_examples=0))
    assert len(reports) == 2
    table = (tmp_path / "comparison.md").read_text()
    assert all(d.name in table for d in model_dirs)
    assert all((tmp_path / d.name / "report.json").exists() for d in model_dirs)


def test_bad_evaluate_inputs(model_dirs, tmp_path):
    with pytest.raises(ev.EvaluateError, match="no model.keras"):
        ev.evaluate(config([tmp_path], tmp_path / "o"))
    with pytest.raises(ValueError, match="unknown threshold policy"):
        ev.evaluate(config(model_dirs[:1], tmp_path / "o", threshold_policy="best"))
    with pytest.raises(Exception, match="no split 'holdout'"):
        ev.evaluate(config(model_dirs[:1], tmp_path / "o", split="holdout"))


def test_predict_handles_broken_files(model_dirs, synthetic_source, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = sorted((synthetic_source / "test" / "PNEUMONIA").iterdir())[:3]
    for p in good:
        (inputs / p.name).write_bytes(p.read_bytes())
    (inputs / "broken.jpeg").write_bytes(good[0].read_bytes()[:200])
    (inputs / "notes.txt").write_text("hello")
    out = predict(PredictConfig(model_dir=str(model_dirs[0]), input=str(inputs),
                                output=str(tmp_path / "p.csv"), threshold=0.4))
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out))}
    assert len(rows) == 5
    for p in good:
        r = rows[p.name]
        assert 0 <= float(r["probability"]) <= 1 and r["error"] == ""
        assert r["decision"] == ("pneumonia" if float(r["probability"]) >= 0.4 else "normal")
    assert rows["broken.jpeg"]["error"] and rows["broken.jpeg"]["probability"] == ""
    assert "not an image" in rows["notes.txt"]["error"]
    # Same probabilities as the model on the pipeline's images of those files.
    assert not list(tmp_path.glob("*partial*"))


def test_evaluate_cli_error_is_clear(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pneumo_eval.evaluate",
                           f"--model_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode != 0 and "evaluate: error:" in proc.stderr
    assert "Traceback" not in proc.stderr
