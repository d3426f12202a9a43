"""A model's threshold and its training data's splits follow it, from the user's side: the
jobs refuse (or loudly flag) a data folder prepared again after training, a report of another
model, and every exported artifact carries the evaluated threshold, which predict applies."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from pneumo_data.common.config import with_leaves
from pneumo_data.prepare import PrepareConfig, prepare
from pneumo_data.synthetic import generate_dataset
from pneumo_eval import evaluate as ev
from pneumo_models.export import ExportConfig, export
from pneumo_models.train import TrainConfig, train
from tests.helpers import run_module, write_image

pytestmark = pytest.mark.slow  # trains models and runs the jobs as processes

COUNTS = {("train", "normal"): 30, ("train", "pneumonia"): 40, ("val", "normal"): 8,
          ("val", "pneumonia"): 8, ("test", "normal"): 8, ("test", "pneumonia"): 8}


def _train(data: Path, run: Path, **kw) -> None:
    options = dict(data_dir=str(data), model_dir=str(run), image_size=32, batch_size=8,
                   epochs=1, steps_per_epoch=2, precision="float32", early_stopping_patience=0)
    train(with_leaves(TrainConfig(), **{**options, **kw}))


def _evaluate(run: Path) -> Path:
    ev.evaluate(ev.EvaluateConfig(model_dir=(str(run),), bootstrap=20, gradcam_examples=0))
    return run / "eval-test" / "report.json"


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` but the lock (a refusing job may take it, then let go)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".pneumo.lock"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(source, data, run, report): a tiny run on its own prepared data, evaluated."""
    root = tmp_path_factory.mktemp("identity")
    source = generate_dataset(root / "source", seed=11, counts=COUNTS, size_range=(40, 48))
    data = root / "data"
    prepare(PrepareConfig(source_dir=str(source), output_dir=str(data), image_size=32,
                          progress=False))
    run = root / "run"
    _train(data, run)
    return source, data, run, _evaluate(run)


def test_every_exported_artifact_carries_the_threshold_and_predict_applies_it(evaluated,
                                                                             tmp_path):
    source, _, run, report = evaluated
    threshold = json.loads(report.read_text())["threshold"]["value"]
    export(ExportConfig(model_dir=str(run), threshold_from=str(report), litert=("float32",)))
    image = next((source / "test" / "PNEUMONIA").iterdir())
    litert_file = run / "export" / "litert" / "float32.tflite"
    for model in (litert_file, run / "export" / "saved_model"):
        out = tmp_path / f"{model.stem}.csv"
        proc = run_module("pneumo_eval.predict", f"--model={model}", f"--input={image}",
                          f"--output={out}", env={"TF_CPP_MIN_LOG_LEVEL": None}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (row,) = csv.DictReader(open(out))
        assert float(row["threshold"]) == pytest.approx(threshold), model
        # Only predict's own lines: no LiteRT "Created TensorFlow Lite XNNPACK delegate", no
        # TensorFlow C++ log lines.
        assert all(line.startswith(("INFO pneumo.", "WARNING pneumo."))
                   for line in proc.stderr.splitlines()), proc.stderr


def test_predict_refuses_the_threshold_of_an_earlier_model_in_the_same_folder(evaluated,
                                                                              tmp_path):
    source, data, _, _ = evaluated
    run = tmp_path / "run"
    _train(data, run, seed=1)
    old_report = _evaluate(run)
    kept = tmp_path / "earlier-report.json"
    shutil.copy(old_report, kept)
    _train(data, run, seed=2, epochs=2, overwrite=True)  # the same folder, another model
    image = next((source / "test" / "NORMAL").iterdir())
    proc = run_module("pneumo_eval.predict", f"--model_dir={run}", f"--input={image}",
                      f"--threshold_from={kept}", f"--output={tmp_path / 'p.csv'}",
                      tensorflow=False, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "predict: error:" in proc.stderr and "another model file" in proc.stderr
    assert not (tmp_path / "p.csv").exists()


def test_data_prepared_again_after_training_is_refused_or_flagged(evaluated, tmp_path):
    source, data, run, report = evaluated
    # The same source, one image more, prepared again into the same folder: the splits move.
    write_image(source / "train" / "NORMAL" / "NORMAL2-IM9999-0001.jpeg", value=70, seed=99)
    try:
        prepare(PrepareConfig(source_dir=str(source), output_dir=str(data), image_size=32,
                              progress=False, overwrite=True))
    finally:
        (source / "train" / "NORMAL" / "NORMAL2-IM9999-0001.jpeg").unlink()
    before = tree(run)
    for module, *args in [
        ("pneumo_eval.evaluate", f"--model_dir={run}", f"--output_dir={tmp_path / 'eval'}"),
        ("pneumo_eval.robustness", f"--model_dir={run}", f"--output_dir={tmp_path / 'rob'}"),
        ("pneumo_models.export", f"--model_dir={run}", f"--threshold_from={report}"),
    ]:
        proc = run_module(module, *args, tensorflow=False, timeout=120)
        assert proc.returncode == 1, (module, proc.stderr[-2000:])
        assert "was prepared again after" in proc.stderr and "Traceback" not in proc.stderr
        assert tree(run) == before, module
    assert not (tmp_path / "eval").exists() and not (tmp_path / "rob").exists()
    # predict's threshold is the run's own; it still scores, with the change said loudly.
    image = next((source / "test" / "NORMAL").iterdir())
    proc = run_module("pneumo_eval.predict", f"--model_dir={run}", f"--input={image}",
                      f"--threshold_from={report}", f"--output={tmp_path / 'p.csv'}",
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "was prepared again after" in proc.stderr
