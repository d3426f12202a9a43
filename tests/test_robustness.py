"""The robustness job on a tiny trained model (generated data, 32 px)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumo_data.common.errors import UserError
from pneumo_data.common.files import file_sha256
from pneumo_eval import robustness as rb
from pneumo_eval import shifts
from pneumo_eval.metrics import binary_metrics
from pneumo_eval.thresholds import choose_threshold
from pneumo_models.rundir import RunDir
from tests.helpers import copy_model_dir, run_module


@pytest.fixture(scope="module")
def model_dir(trained_model_dir, tmp_path_factory):
    return copy_model_dir(trained_model_dir, tmp_path_factory)


def _scored(model_dir, split, size=32):
    from pneumo_models.models import load_model, predictor
    model = load_model(model_dir / "model.keras")
    from pneumo_data.reader import eval_dataset
    images, labels, _ = rb._load_split(eval_dataset, _data_dir(model_dir), split, size, 64)
    return predictor(model), images, labels


def _data_dir(model_dir):
    return RunDir(model_dir).data_dir()


def test_report_is_what_the_shifted_predictions_say(model_dir):
    report = rb.robustness(rb.RobustnessConfig(model_dir=str(model_dir), split="test"))
    out = model_dir / "robustness-test"
    for name in ("report.json", "report.md", "robustness.png", "scores.npz"):
        assert (out / name).exists(), name
    assert json.loads((out / "report.json").read_text()) == report
    assert len(report["conditions"]) == 3 * len(shifts.SHIFTS) == report["headline"]["conditions"]
    # The threshold: chosen on val by evaluate's default policy, and the report says so.
    score, val_images, val_labels = _scored(model_dir, "val")
    val_scores = score(val_images[..., None])
    t = choose_threshold(val_labels, val_scores, "youden").threshold
    assert report["threshold"]["source"] == "val_policy"
    assert report["threshold"]["value"] == pytest.approx(t)
    # One condition recomputed from scratch: shift, predict, metrics at the threshold.
    _, images, labels = _scored(model_dir, "test")
    shifted = shifts.apply("pad", 2, images, seed=0)
    expected = binary_metrics(labels, score(shifted[..., None]), t)
    (got,) = [c for c in report["conditions"] if (c["shift"], c["severity"]) == ("pad", 2)]
    for key in ("roc_auc", "sensitivity", "specificity"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    saved = np.load(out / "scores.npz")
    np.testing.assert_array_equal(saved["labels"], labels)
    assert len(saved.files) == 2 + 1 + len(report["conditions"])  # labels, patients, clean
    # The headline summarises the conditions.
    h = report["headline"]
    aucs = [c["roc_auc"] for c in report["conditions"]]
    assert h["mean_auc"] == pytest.approx(np.mean(aucs))
    specs = [c["specificity"] for c in report["conditions"]]
    assert h["worst_specificity"]["value"] == min(specs)
    low = [c["specificity"] for c in report["conditions"] if c["severity"] < 3]
    assert h["worst_specificity_severity_1_2"]["value"] == min(low)
    assert h[rb.SPEC_KEY] == sum(s < 0.8 for s in specs)
    assert h[rb.SENS_KEY] == sum(c["sensitivity"] < 0.9 for c in report["conditions"])
    assert "mean ROC AUC over 45 conditions" in (out / "report.md").read_text()


def test_threshold_from_a_report_then_the_export_then_val(trained_model_dir, tmp_path,
                                                         tmp_path_factory):
    from pneumo_models.export import ExportConfig, export
    model_dir = copy_model_dir(trained_model_dir, tmp_path_factory)  # its export changes
    out = tmp_path / "r"
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"threshold": {"value": 0.37, "policy": "sensitivity:0.95"},
                                  "model": {"file_sha256": file_sha256(model_dir /
                                                                       "model.keras")}}))
    run = rb.robustness(rb.RobustnessConfig(model_dir=str(model_dir), split="val",
                                            threshold_from=str(report), shifts=("jpeg",),
                                            output_dir=str(out)))
    assert run["threshold"]["source"] == "threshold_from"
    assert run["threshold"]["value"] == 0.37 and len(run["conditions"]) == 3
    # An export given a threshold ships it: that is the default from now on.
    export(ExportConfig(model_dir=str(model_dir), threshold=0.42))
    run = rb.robustness(rb.RobustnessConfig(model_dir=str(model_dir), split="val",
                                            shifts=("jpeg",), output_dir=str(out)))
    assert run["threshold"]["source"] == "export" and run["threshold"]["value"] == 0.42
    # An explicit report still wins, and the report notes what the export ships.
    run = rb.robustness(rb.RobustnessConfig(model_dir=str(model_dir), split="val",
                                            threshold_from=str(report), shifts=("jpeg",),
                                            output_dir=str(out)))
    assert run["threshold"]["value"] == 0.37 and run["threshold"]["export_ships"] == 0.42
    # A report of another model file is refused.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"threshold": {"value": 0.5}, "model": {"file_sha256": "0" * 64}}))
    with pytest.raises(UserError, match="another model file"):
        rb.robustness(rb.RobustnessConfig(model_dir=str(model_dir), threshold_from=str(other),
                                          output_dir=str(out)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(shifts=("fog",)), "unknown shift"),
    (dict(split="nope"), "nope"),
    (dict(threshold_policy="best"), "threshold policy"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_options_fail_before_writing(model_dir, tmp_path, kwargs, message):
    out = tmp_path / "never"
    with pytest.raises(UserError, match=message):
        rb.robustness(rb.RobustnessConfig(model_dir=str(model_dir), output_dir=str(out),
                                          **kwargs))
    assert not out.exists()
    with pytest.raises(UserError, match="model.keras"):
        rb.robustness(rb.RobustnessConfig(model_dir=str(tmp_path), output_dir=str(out)))


def test_command_line(model_dir, tmp_path):
    out = tmp_path / "cli"
    proc = run_module("pneumo_eval.robustness", f"--model_dir={model_dir}", "--shifts=crop,noise",
                      f"--output_dir={out}", "--threshold_policy=sensitivity:0.9", timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert [c["shift"] for c in report["conditions"]] == ["crop"] * 3 + ["noise"] * 3
    assert report["threshold"]["policy"] == "sensitivity:0.9"
    assert "# Robustness" in proc.stdout
