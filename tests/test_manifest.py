import json
from pathlib import Path

import pytest

from pneumo_data import manifest
from tests.helpers import run_module


def write(tmp_path, data) -> Path:
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path


@pytest.fixture
def good(prepared):
    return json.loads((prepared / "manifest.json").read_text())


@pytest.mark.parametrize("key", ["counts", "shards", "image", "classes", "files"])
def test_missing_key_is_a_clear_error(good, tmp_path, key):
    del good[key]
    with pytest.raises(manifest.ManifestError, match=f"key '{key}' is missing"):
        manifest.load_manifest(write(tmp_path, good))


def test_malformed_manifests(good, tmp_path):
    with pytest.raises(manifest.ManifestError, match="expected a JSON object, found a JSON list"):
        manifest.load_manifest(write(tmp_path, [good]))
    bad = json.loads(json.dumps(good))
    bad["image"]["size"] = "256"
    with pytest.raises(manifest.ManifestError, match="image.size"):
        manifest.load_manifest(write(tmp_path, bad))
    bad = json.loads(json.dumps(good))
    del bad["shards"]["train"]["normal"][0]["sha256"]
    with pytest.raises(manifest.ManifestError, match="lacks file, records, bytes or sha256"):
        manifest.load_manifest(write(tmp_path, bad))
    bad = json.loads(json.dumps(good))
    bad["shards"]["train"]["normal"][0]["file"] = "../../etc/passwd"
    with pytest.raises(manifest.ManifestError, match="not a plain file name"):
        manifest.load_manifest(write(tmp_path, bad))
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(manifest.ManifestError, match="not valid JSON"):
        manifest.load_manifest(tmp_path)


@pytest.mark.slow
def test_train_on_a_broken_manifest_is_one_line(good, tmp_path):
    del good["counts"]
    write(tmp_path, good)
    proc = run_module("pneumo_models.train", f"--data_dir={tmp_path}",
                      f"--model_dir={tmp_path / 'run'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "train: error:" in proc.stderr and "key 'counts' is missing" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_preprocess_settings_are_recorded_and_required(good, tmp_path):
    from pneumo_data.preprocess import VERSION, PreprocessSpec
    assert good["preprocess"] == {"version": VERSION, "stored_size": 64, "resize": "stretch",
                                  "fast_jpeg": True, "max_pixels": good["options"]["max_pixels"]}
    spec = manifest.load_manifest(write(tmp_path, good)).preprocess
    assert spec == PreprocessSpec(64, "stretch", True, good["options"]["max_pixels"])
    old = json.loads(json.dumps(good))
    del old["preprocess"]
    with pytest.raises(manifest.ManifestError, match="'preprocess' is missing"):
        manifest.load_manifest(write(tmp_path, old))
    for change, match in (({"resize": "crop"}, "resize"), ({"version": 99}, "version 99"),
                          ({"stored_size": 32}, "is not image.size")):
        bad = json.loads(json.dumps(good))
        bad["preprocess"].update(change)
        with pytest.raises(manifest.ManifestError, match=match):
            manifest.load_manifest(write(tmp_path, bad))
