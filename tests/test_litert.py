"""LiteRT flatbuffers reproduce their source model; int8 calibration reads train images only."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pneumo_data.common.errors import UserError
from pneumo_data.manifest import load_manifest
from pneumo_data.preprocess.model_input import to_model_input_np
from pneumo_data.preprocess.model_input_tf import to_model_input
from pneumo_data.preprocess.spec import PreprocessSpec
from pneumo_data.preprocess.stored import decode_stored
from pneumo_data.reader import eval_dataset
from pneumo_eval.predict import PredictConfig, predict
from pneumo_models import litert
from pneumo_models.edge import LiteRTModel
from pneumo_models.export_meta import LITERT_META, VARIANTS, ExportError
from pneumo_models.models import build_model


def _hashes(array: np.ndarray) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in array}


def _split_images(data_dir, split: str, size: int) -> np.ndarray:
    return np.concatenate([x.numpy() for x, _ in eval_dataset(data_dir, split, image_size=size)])


def test_int8_calibration_reads_only_train_images(prepared, tmp_path):
    # A copy of the data without its val and test shards: calibration must not need them.
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    m = load_manifest(data)
    removed = [data / e["file"] for split in ("val", "test") for label in m.classes
               for e in m.shard_entries(split, label)]
    for path in removed:
        path.unlink()
    calib = litert.calibration_images(data, 64, count=50, seed=1)
    assert calib.images.shape == (50, 64, 64, 1) and calib.images.dtype == np.uint8
    assert calib.split == "train" and calib.shard_files
    assert all(name.startswith("train-") for name in calib.shard_files)
    train, val, test = (_hashes(_split_images(prepared, s, 64)) for s in ("train", "val", "test"))
    seen = _hashes(calib.images)
    assert seen <= train and not seen & (val | test)
    with pytest.raises(ExportError, match="stores 64 px"):
        litert.calibration_images(prepared, 128)


@pytest.fixture(scope="module", params=["manual_cnn", "bn_cnn_crop"])
def litert_files(prepared, tmp_path_factory, request):
    # manual_cnn with its default standardisation; bn_cnn (batch norm, global pooling) with a
    # border crop as well: the model's own preprocessing goes into the flatbuffer.
    if request.param == "manual_cnn":
        model = build_model("manual_cnn", image_size=40, weights="none", seed=3)
    else:
        model = build_model("bn_cnn", image_size=40, weights="none", seed=3, crop=0.1)
    spec = PreprocessSpec(stored_size=64)
    out = tmp_path_factory.mktemp("litert") / "litert"
    paths = litert.export_litert(model, out, spec, data_dir=prepared, calibration=64)
    return model, paths, out


@pytest.mark.slow
def test_litert_variants_reproduce_the_keras_model(prepared, litert_files):
    model, paths, out = litert_files
    test = _split_images(prepared, "test", 64)
    want = model.predict(to_model_input(test, 40), verbose=0)[:, 0]
    tolerance = {"float32": 1e-5, "float16": 5e-3, "int8": 0.05}
    for variant, path in paths.items():
        edge = LiteRTModel(path)
        assert edge.stored_size == 64
        got = edge.predict(test, batch_size=7)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= tolerance[variant], variant
        # One image at a time (the file's own batch of 1) gives the same numbers.
        np.testing.assert_allclose(edge.predict(test[:3], batch_size=1), got[:3], atol=1e-6)
        assert "GATHER" in edge.ops() and not any("FLEX" in op for op in edge.ops())
    meta = json.loads((out / LITERT_META).read_text())
    assert meta["calibration"]["split"] == "train" and meta["calibration"]["images"] == 64
    assert meta["preprocess"] == PreprocessSpec(stored_size=64).to_dict()
    assert set(meta["variants"]) == set(VARIANTS)
    sizes = {v: paths[v].stat().st_size for v in paths}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]


def test_litert_stage_b_is_exact(tmp_path):
    """A model that returns its input's mean shows the flatbuffer's stage (b) pixels."""
    import keras

    inputs = keras.Input((40, 40, 1), dtype="uint8")
    x = keras.layers.Lambda(lambda t: keras.ops.mean(keras.ops.cast(t, "float32"),
                                                     axis=(1, 2, 3)) / 255.0)(inputs)
    probe = keras.Model(inputs, keras.layers.Reshape((1,))(x))
    (tmp_path / "probe.tflite").write_bytes(litert.convert(probe, 64, "float32"))
    stored = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 1)).astype(np.uint8)
    got = LiteRTModel(tmp_path / "probe.tflite").predict(stored)
    want = to_model_input_np(stored, 40).astype(np.float64).mean(axis=(1, 2, 3)) / 255
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bf16_models_are_copied_to_float32():
    model = build_model("manual_cnn", image_size=40, weights="none", seed=0,
                        precision="mixed_bfloat16")
    copy = litert.float32_copy(model)
    assert all(layer.dtype_policy.name == "float32" for layer in copy.layers)
    for a, b in zip(model.get_weights(), copy.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert litert.convert(model, 48, "float32")[4:8] == b"TFL3"


def test_int8_without_calibration_data_is_refused(tmp_path):
    model = build_model("manual_cnn", image_size=40, weights="none", seed=0)
    with pytest.raises(ExportError, match="data_dir"):
        litert.export_litert(model, tmp_path / "l", PreprocessSpec(stored_size=64),
                             variants=["int8"])
    assert not (tmp_path / "l").exists()


@pytest.mark.slow
def test_litert_refuses_wrong_input(litert_files, tmp_path):
    _, paths, _ = litert_files
    edge = LiteRTModel(paths["float32"])
    with pytest.raises(ValueError, match="uint8"):
        edge.predict(np.zeros((1, 32, 32, 1), np.uint8))
    (tmp_path / "x.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(UserError, match="not a LiteRT flatbuffer"):
        LiteRTModel(tmp_path / "x.tflite")


@pytest.mark.slow  # exports a SavedModel / converts to LiteRT (module fixture)
def test_predict_runs_a_tflite_file(litert_files, tmp_path):
    model, paths, _ = litert_files
    pixels = np.random.default_rng(5).integers(0, 256, (90, 120)).astype(np.uint8)
    image = tmp_path / "x.png"
    Image.fromarray(pixels).save(image)
    (tmp_path / "bad.jpeg").write_bytes(b"\xff\xd8\xff broken")
    out = predict(PredictConfig(model=str(paths["float32"]), input=str(tmp_path),
                                output=str(tmp_path / "p.csv"), threshold=0.25))
    rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(open(out))}
    stored = decode_stored(image.read_bytes(), PreprocessSpec(stored_size=64))
    want = float(model.predict(to_model_input(stored[None, ..., None], 40), verbose=0)[0, 0])
    assert float(rows["x.png"]["probability"]) == pytest.approx(want, abs=1e-5)
    assert float(rows["x.png"]["threshold"]) == 0.25
    assert rows["bad.jpeg"]["error"] and rows["bad.jpeg"]["probability"] == ""
    lone = tmp_path / "lone" / "m.tflite"
    lone.parent.mkdir()
    shutil.copy(paths["float32"], lone)
    with pytest.raises(UserError, match="litert.json"):
        predict(PredictConfig(model=str(lone), input=str(image), output=str(tmp_path / "q.csv")))
