import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pneumo_data
from pneumo_data.common.config import with_leaves
from pneumo_data.common.errors import UserError
from pneumo_data.manifest import ManifestError
from pneumo_eval import evaluate as ev
from pneumo_eval.evaluation import predict_split
from pneumo_eval.metrics import binary_metrics
from pneumo_eval.predict import PredictConfig, PredictError, predict
from pneumo_eval.thresholds import choose_threshold
from pneumo_models.models import load_model
from pneumo_models.train import TrainConfig, train
from tests.helpers import run_module


@pytest.fixture(scope="module")
def model_dirs(prepared, tmp_path_factory):
    dirs = []
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"model{seed}")
        train(with_leaves(TrainConfig(), data_dir=str(prepared), model_dir=str(out),
                          image_size=32, batch_size=16, epochs=2, precision="float32",
                          seed=seed, early_stopping_patience=0))
        dirs.append(out)
    return dirs


def config(dirs, out, **kw):
    base = dict(model_dir=tuple(str(d) for d in dirs), output_dir=str(out), bootstrap=50,
                gradcam_examples=1)
    base.update(kw)
    return ev.EvaluateConfig(**base)


def test_report_threshold_from_val_applied_to_test(model_dirs, prepared, tmp_path):
    (report,) = ev.evaluate(config(model_dirs[:1], tmp_path, threshold_policy="youden"))
    model = load_model(model_dirs[0] / "model.keras")
    val = predict_split(model, prepared, "val", 64)
    test = predict_split(model, prepared, "test", 64)
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
    with pytest.raises(ManifestError, match="no split 'holdout'"):
        ev.evaluate(config(model_dirs[:1], tmp_path / "o", split="holdout"))


def test_predict_handles_broken_files(model_dirs, synthetic_source, prepared, tmp_path):
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
    model = load_model(model_dirs[0] / "model.keras")
    size = int(model.inputs[0].shape[1])
    wanted = {f"test/PNEUMONIA/{p.name}" for p in good}
    found = {}
    for images, _, meta in pneumo_data.eval_dataset(prepared, "test", image_size=size,
                                                    with_metadata=True):
        for image, path in zip(images.numpy(), meta["source_path"].numpy()):
            if path.decode() in wanted:
                found[path.decode().split("/")[-1]] = image
    assert set(found) == {p.name for p in good}
    batch = np.stack([found[p.name] for p in good])
    expected = np.asarray(model(batch, training=False))[:, 0]
    got = np.array([float(rows[p.name]["probability"]) for p in good])
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert not list(tmp_path.glob("*partial*"))


@pytest.mark.slow
def test_evaluate_cli_error_is_clear(tmp_path):
    proc = run_module("pneumo_eval.evaluate", f"--model_dir={tmp_path}")
    assert proc.returncode != 0 and "evaluate: error:" in proc.stderr
    assert "Traceback" not in proc.stderr


def predict_cli(*args):
    return run_module("pneumo_eval.predict", *args)


def test_predict_refuses_outputs_it_did_not_write_before_any_work(model_dirs, synthetic_source,
                                                                   tmp_path):
    image = next((synthetic_source / "test" / "NORMAL").iterdir())
    mine = tmp_path / "mine.csv"
    mine.write_text("patient,notes\n1,keep\n")
    # A hand-made file with predict's own header is not predict's either.
    lookalike = tmp_path / "labels.csv"
    lookalike.write_text("path,probability,decision,threshold,error\nx.jpeg,,pneumonia,,\n")
    for output, match in ((tmp_path, "is a folder"), (mine, "not an unedited output"),
                          (lookalike, "not an unedited output")):
        with pytest.raises(PredictError, match=match):
            predict(PredictConfig(model_dir=str(model_dirs[0]), input=str(image),
                                  output=str(output)))
    assert mine.read_text() == "patient,notes\n1,keep\n"
    assert lookalike.read_text().endswith("x.jpeg,,pneumonia,,\n")
    first = predict(PredictConfig(model_dir=str(model_dirs[0]), input=str(image),
                                  output=str(tmp_path / "p.csv")))
    again = predict(PredictConfig(model_dir=str(model_dirs[0]), input=str(image),
                                  output=str(first), threshold=0.9))  # its own file: replaced
    assert "0.9" in again.read_text()
    # A radiologist corrects a decision in predict's CSV: the next run keeps their file.
    edited = again.read_text().replace("normal", "pneumonia").replace("0.9,", "0.9,checked ")
    again.write_text(edited)
    with pytest.raises(PredictError, match="not an unedited output"):
        predict(PredictConfig(model_dir=str(model_dirs[0]), input=str(image),
                              output=str(again)))
    assert again.read_text() == edited
    (tmp_path / "report.txt").write_text("not json")
    proc = predict_cli(f"--model_dir={model_dirs[0]}", f"--input={image}",
                       f"--output={tmp_path / 'q.csv'}",
                       f"--threshold_from={tmp_path / 'report.txt'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"predict: error: --threshold_from {tmp_path / 'report.txt'} is not valid JSON" in (
        proc.stderr)
    assert not (tmp_path / "q.csv").exists()


def test_evaluate_refuses_an_output_folder_with_someone_elses_files(model_dirs, tmp_path):
    (tmp_path / "theirs.txt").write_text("keep")
    with pytest.raises(UserError, match="theirs.txt"):
        ev.evaluate(config(model_dirs[:1], tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["theirs.txt"]


# ---------------------------------------------------------------- across datasets

@pytest.fixture(scope="module")
def export_data(tmp_path_factory):
    """Dataset B: a DICOM export with a CSV, stored at 24 px with padding (the models read
    32 px stretched images of another dataset)."""
    pytest.importorskip("pydicom")
    from pneumo_data.prepare import PrepareConfig, prepare
    from tests.source_layouts import write_export
    root = tmp_path_factory.mktemp("b")
    write_export(root / "export", n=48)
    prepare(with_leaves(PrepareConfig(), source_dir=str(root / "export"),
                        output_dir=str(root / "data"), image_size=24, resize="pad",
                        labels_csv="labels.csv", path_column="file", label_column="finding",
                        positive_values="Pneumonia", val_fraction=0.25, test_fraction=0.25,
                        progress=False))
    return root / "data"


def test_cross_dataset_threshold_from_the_training_data(model_dirs, prepared, export_data,
                                                        tmp_path):
    (report,) = ev.evaluate(config(model_dirs[:1], tmp_path, data_dir=str(export_data),
                                   gradcam_examples=0))
    model = load_model(model_dirs[0] / "model.keras")
    val_a = predict_split(model, prepared, "val", 64)
    test_b = predict_split(model, export_data, "test", 64)
    chosen = choose_threshold(val_a.labels, val_a.scores, "youden")
    assert report["threshold"]["value"] == pytest.approx(chosen.threshold)
    assert report["threshold"]["data_dir"] == str(prepared)
    assert "applied unchanged to another dataset" in report["threshold"]["note"]
    expected = binary_metrics(test_b.labels, test_b.scores, chosen.threshold)
    assert report["counts"] == {k: expected[k] for k in ("tn", "fp", "fn", "tp")}
    assert report["data"]["images"] == pneumo_data.load_manifest(export_data).count("test")
    assert report["cross_dataset"] is True
    assert (report["data"]["name"], report["data"]["preset"]) == ("export", "csv")
    assert (report["data"]["stored_size"], report["data"]["resize"]) == (24, "pad")
    assert report["train_data"]["dir"] == str(prepared)
    assert report["train_data"]["preset"] == "kaggle"
    assert report["subtype_sensitivity"] == {}  # a CSV source has no subtypes
    warnings = "\n".join(report["warnings"])
    assert "upsampled: " in warnings and "at 24 px and read at the model's 32 px" in warnings
    assert "geometry differs" in warnings and "--resize=pad" in warnings
    assert "label rules differ: trained on folder names" in warnings
    assert "overlap" not in warnings
    text = (tmp_path / "report.md").read_text()
    assert f"Trained on: {report['train_data']['name']} (kaggle" in text
    assert "Evaluated on: export test" in text and "Warnings:" in text


def test_cross_dataset_threshold_on_the_target_is_labelled_as_peeking(model_dirs, export_data,
                                                                      tmp_path):
    (report,) = ev.evaluate(config(model_dirs[:1], tmp_path, data_dir=str(export_data),
                                   threshold_data="target", gradcam_examples=0))
    model = load_model(model_dirs[0] / "model.keras")
    val_b = predict_split(model, export_data, "val", 64)
    chosen = choose_threshold(val_b.labels, val_b.scores, "youden")
    assert report["threshold"]["value"] == pytest.approx(chosen.threshold)
    assert report["threshold"]["data"] == "export"
    assert "re-tuned on the target domain" in report["threshold"]["note"]


def test_cross_dataset_overlap_with_the_training_images_is_flagged(model_dirs, synthetic_source,
                                                                   tmp_path):
    # B: copies of A's own training images in a plain NORMAL/PNEUMONIA folder.
    import shutil

    from pneumo_data.prepare import PrepareConfig, prepare
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "copy" / cls).mkdir(parents=True)
        for p in sorted((synthetic_source / "train" / cls).iterdir())[:12]:
            shutil.copy(p, tmp_path / "copy" / cls / p.name)
    m = prepare(PrepareConfig(source_dir=str(tmp_path / "copy"), output_dir=str(tmp_path / "b"),
                              image_size=48, progress=False))
    (report,) = ev.evaluate(config(model_dirs[:1], tmp_path / "r", data_dir=str(m.data_dir),
                                   gradcam_examples=0))
    assert report["warnings"] == [f"overlap: {m.count('test')} evaluated image(s) are "
                                  f"byte-identical to images of the model's train or val split"]
    assert report["data"]["name"] == "copy"


def test_tta_and_calibration_in_the_report(model_dirs, prepared, tmp_path):
    (report,) = ev.evaluate(config(model_dirs[:1], tmp_path, tta="flip", gradcam_examples=0))
    model = load_model(model_dirs[0] / "model.keras")
    val = predict_split(model, prepared, "val", 64, tta="flip")
    plain = predict_split(model, prepared, "val", 64)
    assert not np.allclose(val.scores, plain.scores)
    chosen = choose_threshold(val.labels, val.scores, "youden")
    assert report["tta"] == "flip" and report["options"]["tta"] == "flip"
    assert report["threshold"]["value"] == pytest.approx(chosen.threshold)
    calibration = report["calibration"]
    assert calibration["fitted_on"] == "val" and calibration["temperature"] > 0
    assert set(calibration["platt"]) == {"a", "b"}
    for part in ("val", "evaluated"):
        assert {"ece", "ece_temperature", "ece_platt"} <= set(calibration[part])
    assert {"ece_platt_prior", "estimated_prevalence"} <= set(calibration["evaluated"])
    text = (tmp_path / "report.md").read_text()
    assert "Test-time augmentation: `flip`" in text and "after Platt" in text
    assert "holds only at val's prevalence" in text and "prior correction" in text


def test_predict_tta_is_the_mean_over_the_views(model_dirs, synthetic_source, prepared, tmp_path):
    from pneumo_data.manifest import load_manifest
    from pneumo_data.preprocess import decode
    from pneumo_data.preprocess.model_input_tf import to_model_input
    from pneumo_models.models import predictor
    image = sorted((synthetic_source / "test" / "PNEUMONIA").iterdir())[0]
    rows = {}
    for mode in ("none", "flip"):
        out = predict(PredictConfig(model_dir=str(model_dirs[0]), input=str(image),
                                    output=str(tmp_path / f"{mode}.csv"), tta=mode))
        rows[mode] = float(next(csv.DictReader(open(out)))["probability"])
    spec = load_manifest(prepared).preprocess
    stored = decode(image, spec).pixels
    model = load_model(model_dirs[0] / "model.keras")
    x = to_model_input(stored[None, ..., None], int(model.inputs[0].shape[1]))
    score = predictor(model)
    assert rows["none"] == pytest.approx(score(x)[0], abs=1e-6)
    assert rows["flip"] == pytest.approx((score(x)[0] + score(x[:, :, ::-1])[0]) / 2, abs=1e-6)
