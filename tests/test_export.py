"""The serving SavedModel reproduces its source model; the export job keeps the ledger rules."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pneumo_data.common.config import config_from_dict, with_leaves
from pneumo_data.common.errors import UserError
from pneumo_data.common.files import file_sha256
from pneumo_data.common.outputs import LEDGER_NAME, FolderBusyError, OutputDir
from pneumo_data.preprocess.exif import ORIENTATION_TAG
from pneumo_data.preprocess.model_input_tf import to_model_input
from pneumo_data.preprocess.spec import PreprocessSpec
from pneumo_data.preprocess.stored import decode_stored
from pneumo_eval.predict import PredictConfig, PredictError, predict
from pneumo_models.export import ExportConfig, export
from pneumo_models.export_meta import ExportError, load_serving_meta
from pneumo_models.models import build_model, load_model
from pneumo_models.rundir import RunDir
from pneumo_models.serving import export_saved_model
from pneumo_models.train import TrainConfig, train
from tests.helpers import copy_model_dir, run_module


def encode(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **kw)
    return buffer.getvalue()


def images(seed: int, sizes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        y, x = np.mgrid[0:h, 0:w]
        base = 80 + 100 * x / w + rng.normal(0, 15, (h, w)) + 30 * np.sin(y / 7)
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def small_model():
    return build_model("manual_cnn", image_size=40, weights="none", seed=0)


@pytest.fixture(scope="module")
def exported(small_model, tmp_path_factory):
    spec = PreprocessSpec(stored_size=64)
    path = export_saved_model(small_model, tmp_path_factory.mktemp("serve") / "serving", spec,
                              threshold=0.5, threshold_source="test")
    return path, spec, tf.saved_model.load(str(path))


def reference(model, spec, files: list[bytes]) -> np.ndarray:
    """The Pillow route (ingest + pipeline, predict): stage (a), stage (b), the Keras model."""
    stored = np.stack([decode_stored(f, spec) for f in files])[..., None]
    pixels = to_model_input(stored, int(model.inputs[0].shape[1]))
    return model.predict(pixels, verbose=0)[:, 0]


@pytest.mark.slow
def test_bytes_signature_equals_the_pillow_path(small_model, exported):
    path, spec, loaded = exported
    pixels = images(0, [(64, 64), (300, 200), (97, 131), (1500, 1300)])
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    files = [encode(pixels[0], "PNG"), encode(pixels[1], "JPEG", quality=90),
             encode(np.stack([pixels[2]] * 3, -1), "JPEG"),
             encode(pixels[3], "JPEG", exif=exif.tobytes()),
             encode(pixels[1].astype(np.uint16) * 257, "PNG")]
    out = loaded.signatures["serving_default"](images=tf.constant(files))
    want = reference(small_model, spec, files)
    np.testing.assert_allclose(out["probability"].numpy(), want, atol=1e-6)
    threshold = out["threshold"].numpy()
    assert threshold.shape == (5,) and (threshold == 0.5).all()
    decisions = [d.decode() for d in out["decision"].numpy()]
    assert decisions == ["pneumonia" if p >= 0.5 else "normal" for p in want]
    assert not path.with_name(path.name + ".partial").exists()


@pytest.mark.slow  # exports a SavedModel / converts to LiteRT (module fixture)
def test_pixels_signature_any_size(small_model, exported):
    _, spec, loaded = exported
    serve = loaded.signatures["serve_pixels"]
    stored = np.stack(images(1, [(64, 64)] * 3))[..., None]
    got = serve(pixels=tf.constant(stored))["probability"].numpy()
    want = small_model.predict(to_model_input(stored, 40), verbose=0)[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Another size gets stage (a)'s resize first: the same as decoding a PNG of it.
    odd = images(2, [(90, 70), (90, 70)])
    got = serve(pixels=tf.constant(np.stack(odd)[..., None]))["probability"].numpy()
    want = reference(small_model, spec, [encode(o, "PNG") for o in odd])
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.slow
def test_saved_model_keeps_the_models_preprocessing(tmp_path):
    """bn_cnn with per-image standardisation and a border crop: both run inside the
    SavedModel as they run in Keras."""
    model = build_model("bn_cnn", image_size=40, weights="none", seed=1, crop=0.1)
    assert model.get_layer("preprocess").mode == "standardize"
    spec = PreprocessSpec(stored_size=64)
    loaded = tf.saved_model.load(str(export_saved_model(model, tmp_path / "s", spec)))
    stored = np.stack(images(3, [(64, 64)] * 4))[..., None]
    got = loaded.signatures["serve_pixels"](pixels=tf.constant(stored))["probability"].numpy()
    want = model.predict(to_model_input(stored, 40), verbose=0)[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.slow  # exports a SavedModel / converts to LiteRT (module fixture)
def test_bytes_signature_errors_say_why(exported):
    _, _, loaded = exported
    serve = loaded.signatures["serving_default"]
    dicom = b"\x00" * 128 + b"DICM" + b"\x00" * 200
    with pytest.raises(tf.errors.InvalidArgumentError, match="DICOM.*serve_pixels"):
        serve(images=tf.constant([dicom]))
    jpeg = encode(images(3, [(80, 80)])[0], "JPEG")
    with pytest.raises(tf.errors.InvalidArgumentError):
        serve(images=tf.constant([jpeg[: len(jpeg) // 2]]))


@pytest.mark.slow  # exports a SavedModel / converts to LiteRT (module fixture)
def test_metadata_records_spec_and_threshold(exported):
    path, spec, _ = exported
    meta = load_serving_meta(path)
    assert meta["preprocess"] == spec.to_dict() and meta["model_size"] == 40
    assert meta["threshold"] == 0.5 and meta["threshold_source"] == "test"
    assert set(meta["signatures"]) >= {"serving_default", "serve_pixels"}


def test_standalone_export_checks_threshold_and_foreign_folders(small_model, tmp_path):
    with pytest.raises(ExportError, match="threshold"):
        export_saved_model(small_model, tmp_path / "s", PreprocessSpec(), threshold=1.5)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="not a pneumo export"):
        export_saved_model(small_model, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------ the export job

@pytest.fixture(scope="module")
def model_dir(trained_model_dir, tmp_path_factory):
    return copy_model_dir(trained_model_dir, tmp_path_factory)


def _report(path: Path, model_dir: Path, value: float, sha: str | None = None) -> Path:
    """The parts of an evaluate report.json that the export job reads."""
    path.write_text(json.dumps({
        "threshold": {"policy": "youden", "value": value, "chosen_on": "val"},
        "model": {"file_sha256": sha or file_sha256(model_dir / "model.keras")}}))
    return path


def _val_images(data_dir, size: int) -> np.ndarray:
    from pneumo_data.reader import eval_dataset
    return np.concatenate([x.numpy() for x, _ in eval_dataset(data_dir, "val", image_size=size)])


def test_training_exports_with_the_manifests_settings(model_dir, prepared):
    saved = model_dir / "export" / "saved_model"
    meta = load_serving_meta(saved)
    assert meta["preprocess"] == json.loads((prepared / "manifest.json").read_text())[
        "preprocess"]
    assert meta["threshold"] == 0.5 and "no threshold chosen" in meta["threshold_source"]
    assert meta["model_sha256"] == file_sha256(model_dir / "model.keras")
    ledger = json.loads((model_dir / LEDGER_NAME).read_text())
    assert ledger["entries"]["export"]["job"] == "export"
    inner = json.loads((model_dir / "export" / LEDGER_NAME).read_text())
    assert inner["job"] == "export" and set(inner["entries"]) == {"saved_model"}


def test_export_job_reexports_with_the_evaluated_threshold(model_dir, prepared, tmp_path):
    model = load_model(model_dir / "model.keras")
    (model_dir / "notes.txt").write_text("mine")
    (model_dir / "export" / "mine.txt").write_text("mine too")
    report = _report(tmp_path / "report.json", model_dir, 0.3)
    result = export(ExportConfig(model_dir=str(model_dir), threshold_from=str(report)))
    meta = load_serving_meta(result["saved_model"])
    assert meta["threshold"] == 0.3 and "youden" in meta["threshold_source"]
    loaded = tf.saved_model.load(result["saved_model"])
    stored = _val_images(prepared, 64)
    out = loaded.signatures["serve_pixels"](pixels=tf.constant(stored))
    want = model.predict(to_model_input(stored, 32), verbose=0)[:, 0]
    np.testing.assert_allclose(out["probability"].numpy(), want, atol=1e-6)
    assert (out["threshold"].numpy() == np.float32(0.3)).all()
    # The user's files survive, in the model_dir and inside the export job's folder.
    assert (model_dir / "notes.txt").read_text() == "mine"
    assert (model_dir / "export" / "mine.txt").read_text() == "mine too"
    # predict --model on the SavedModel uses its threshold and gives the Keras probabilities.
    csv_path = tmp_path / "p.csv"
    image = tmp_path / "x.png"
    Image.fromarray(stored[0, ..., 0]).save(image)
    predict(PredictConfig(model=result["saved_model"], input=str(image), output=str(csv_path)))
    (row,) = csv.DictReader(open(csv_path))
    assert float(row["threshold"]) == pytest.approx(0.3)
    assert float(row["probability"]) == pytest.approx(float(want[0]), abs=1e-5)


def test_export_job_refuses_bad_inputs_and_touches_nothing(model_dir, tmp_path):
    before = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*"))
    stale = _report(tmp_path / "stale.json", model_dir, 0.2, sha="0" * 64)
    cases = [(ExportConfig(model_dir=str(model_dir), threshold_from=str(stale)),
              "evaluated another model"),
             (ExportConfig(model_dir=str(model_dir), threshold=0.2, threshold_from=str(stale)),
              "not both"),
             (ExportConfig(model_dir=str(model_dir), threshold=2.0), "threshold"),
             (ExportConfig(model_dir=str(model_dir), litert=("int4",)), "unknown variant"),
             (ExportConfig(model_dir=str(tmp_path)), "no model.keras")]
    for config, match in cases:
        with pytest.raises(UserError, match=match):
            export(config)
    with OutputDir(model_dir, "train"), pytest.raises(FolderBusyError):
        export(ExportConfig(model_dir=str(model_dir)))  # a training job holds the folder
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == before


def test_a_user_file_inside_the_saved_model_is_never_deleted(model_dir):
    extra = model_dir / "export" / "saved_model" / "README.txt"
    extra.write_text("mine")
    stamp = (model_dir / "export" / "saved_model" / "saved_model.pb").stat().st_mtime_ns
    try:
        with pytest.raises(UserError, match="README.txt"):
            export(ExportConfig(model_dir=str(model_dir), litert=("float32",)))
        assert extra.read_text() == "mine"
        # Checked before anything was written: no litert/, the SavedModel untouched.
        assert not (model_dir / "export" / "litert").exists()
        assert (model_dir / "export" / "saved_model" / "saved_model.pb").stat().st_mtime_ns \
            == stamp
    finally:
        extra.unlink()


def test_train_overwrite_keeps_user_files_in_the_export_folder(trained_model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_model_dir, out)
    (out / "export" / "mine.txt").write_text("x")
    config = config_from_dict(TrainConfig, {"overwrite": False, **RunDir(out).config()})
    train(with_leaves(config, model_dir=str(out), seed=1, overwrite=True))
    assert (out / "export" / "mine.txt").read_text() == "x"
    meta = load_serving_meta(out / "export" / "saved_model")
    assert meta["threshold"] == 0.5 and meta["model_sha256"] == file_sha256(out / "model.keras")


@pytest.mark.slow
def test_export_cli_errors_are_one_line(tmp_path):
    proc = run_module("pneumo_models.export", f"--model_dir={tmp_path / 'nope'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "export: error: --model_dir" in proc.stderr and "does not exist" in proc.stderr


def test_predict_refuses_unknown_model_kinds(tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(images(0, [(20, 20)])[0]).save(image)
    (tmp_path / "folder").mkdir()
    (tmp_path / "m.h5").write_text("x")
    for model, match in ((tmp_path / "folder", "without saved_model.pb"),
                         (tmp_path / "m.h5", "expected a .keras"),
                         (tmp_path / "none.keras", "does not exist")):
        with pytest.raises(PredictError, match=match):
            predict(PredictConfig(model=str(model), input=str(image),
                                  output=str(tmp_path / "p.csv")))
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.slow  # exports a SavedModel / converts to LiteRT (module fixture)
def test_dicom_through_serve_pixels_and_predict_equals_ingest(small_model, exported, tmp_path):
    """DICOM: decoded and windowed outside the graph, then serve_pixels, gives the ingest route's
    probability; predict reads DICOM files the same way."""
    from pneumo_data.preprocess import dicom
    from tests.dicom_files import gradient, make_dataset, to_bytes

    path, spec, loaded = exported
    data = to_bytes(make_dataset(gradient((150, 110), 0, 4095), bits_stored=12,
                                 WindowCenter=1800, WindowWidth=2600))
    stored, _ = dicom.decode_dicom(data, spec)  # what ingest stores
    want = small_model.predict(to_model_input(stored[None, ..., None], 40), verbose=0)[0, 0]
    import pydicom  # what a client does before calling serve_pixels
    windowed, _ = dicom.dicom_to_uint8(pydicom.dcmread(io.BytesIO(data)))
    got = loaded.signatures["serve_pixels"](pixels=tf.constant(windowed[None, ..., None]))
    assert float(got["probability"][0]) == pytest.approx(float(want), abs=1e-6)
    (tmp_path / "x.dcm").write_bytes(data)
    out = predict(PredictConfig(model=str(path), input=str(tmp_path / "x.dcm"),
                                output=str(tmp_path / "p.csv")))
    (row,) = csv.DictReader(open(out))
    assert row["error"] == "" and float(row["probability"]) == pytest.approx(float(want),
                                                                             abs=1e-5)
