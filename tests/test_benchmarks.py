"""Smoke tests: each benchmark runs with tiny sizes and writes its outputs.

They assert the structure of what is written, never a speed.
"""

import json
import re

import pytest

from tests.helpers import run_module


def run(module, tmp_path, *args):
    proc = run_module(module, f"--output_dir={tmp_path}", "--name=result", *args, timeout=900,
                      env={"PNEUMO_CACHE": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": None})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # As a user runs it (no log-level override): no TensorFlow C++ INFO lines.
    assert not re.search(r"^I\d{4} |absl::InitializeLog", proc.stderr, re.M), proc.stderr[-3000:]
    payload = json.loads((tmp_path / "result.json").read_text())
    assert payload["environment"]["tensorflow"] and payload["environment"]["cores"] >= 1
    assert "| " in (tmp_path / "result.md").read_text()
    return payload


@pytest.fixture
def tiny_source(synthetic_source):
    return f"--source_dir={synthetic_source}"


@pytest.mark.slow
def test_throughput_smoke(tmp_path, tiny_source):
    payload = run("benchmarks.throughput", tmp_path, tiny_source, "--seconds=0.2",
                  "--repeats=1", "--image_size=32", "--batch_size=8", "--plot")
    assert len(payload["results"]) == 9
    assert any(name.startswith("pneumo residency='device'") for name in payload["results"])
    assert all(r["median"] > 0 for r in payload["results"].values())
    assert payload["fused_over_chain"] > 0 and payload["intensity_on_over_off"] > 0
    assert len(payload["augmentation_alone"]) == 3
    assert (tmp_path / "result.png").exists()


@pytest.mark.slow
def test_train_step_smoke(tmp_path, tiny_source):
    # A mixed policy with XLA off and on (float32 is timed by the stems test below).
    payload = run("benchmarks.train_step", tmp_path, tiny_source, "--models=manual_cnn",
                  "--precisions=mixed_bfloat16", "--jit=false,true", "--image_size=32",
                  "--batch_size=4", "--steps=1", "--warmup_steps=1", "--repeats=1", "--plot")
    cells = payload["cells"]
    assert len(cells) == 2 and not [c for c in cells if "error" in c]
    assert [c["jit_compile"] for c in cells] == [False, True]
    for c in cells:
        assert c["memory"]["median"] > 0 and c["pipeline"]["median"] > 0
        assert isinstance(c["input_kept_up"], bool)
    assert (tmp_path / "result.png").exists()


@pytest.mark.slow
def test_epoch_smoke(tmp_path, tiny_source):
    payload = run("benchmarks.epoch", tmp_path, tiny_source, "--image_size=32",
                  "--batch_size=8", "--epochs=1", "--max_images=16")
    assert len(payload["old_recipe_seconds"]) == 1 and len(payload["pneumo_seconds"]) == 1
    assert payload["steps_per_epoch"] == 2 and payload["old_over_pneumo_last_epoch"] > 0


@pytest.mark.slow
def test_prepare_dicom_smoke(tmp_path):
    pytest.importorskip("pydicom")
    payload = run("benchmarks.prepare", tmp_path, "--dicom", "--dicom_images=4",
                  "--dicom_side=128", "--image_size=32", "--threads=1,2", "--repeats=1")
    assert set(payload["prepare"]) == {"threads=1", "threads=2"}
    assert all(t["median"] > 0 for t in payload["prepare"].values())
    assert set(payload["decode"]) == {
        "dicom 16-bit window", "dicom 12-bit MONOCHROME1 min/max", "dicom RLE 16-bit window",
        "png 16-bit (reference)", "header only (planning)"}
    assert all(r[f"threads={t}"]["median"] > 0 for r in payload["decode"].values()
               for t in (1, 2))
    assert set(payload["stage_ms"]) == {"read bytes", "pydicom parse", "pixel_array",
                                        "modality+VOI to uint8", "resize"}


@pytest.mark.slow
def test_prepare_runners_smoke(tmp_path, tiny_source):
    import importlib.util
    runners = "threads,beam:1" if importlib.util.find_spec("apache_beam") else "threads"
    payload = run("benchmarks.prepare", tmp_path, tiny_source, f"--runners={runners}",
                  "--repeats=1", "--image_size=16")
    assert list(payload["results"]) == runners.split(",")
    images = {r["images"] for r in payload["results"].values()}
    assert len(images) == 1 and images.pop() > 0  # every writer wrote the same records
    assert all(r["img_per_s"] > 0 and len(r["seconds"]) == 1
               for r in payload["results"].values())


def test_serving_and_parity_smoke(trained_model_dir, synthetic_source, tmp_path_factory,
                                  tmp_path):
    from pneumo_models.export import ExportConfig, export
    from tests.helpers import copy_model_dir
    model_dir = copy_model_dir(trained_model_dir, tmp_path_factory)
    export(ExportConfig(model_dir=str(model_dir), litert=("float32", "int8"),
                        calibration_images=16))
    payload = run("benchmarks.serving", tmp_path, f"--model_dir={model_dir}", "--limit=24",
                  "--latency_runs=3", "--warmup=1", "--batch_size=4", "--repeats=1")
    results = payload["results"]
    assert set(results) == {"Keras", "Keras float32", "SavedModel pixels", "SavedModel bytes",
                            "LiteRT float32", "LiteRT int8"}
    for route in ("Keras float32", "SavedModel pixels", "SavedModel bytes", "LiteRT float32"):
        assert results[route]["max_abs_diff_vs_keras"] <= 1e-5, route
    assert all(r["latency"]["p50_ms"] > 0 and r["throughput"]["images_per_s"] > 0
               for r in results.values())
    assert payload["litert"]["calibration"]["split"] == "train"
    (tmp_path / "result.json").unlink()
    payload = run("benchmarks.parity", tmp_path, f"--model_dir={model_dir}",
                  f"--source_dir={synthetic_source / 'test'}", "--limit=12")
    assert 0 < payload["files"] <= 12
    assert payload["after"]["probability"]["max_abs_diff"] <= 1e-5
    assert payload["after"]["stored_pixels"]["differ"] == 0


@pytest.mark.slow
def test_scaling_smoke(tmp_path, tiny_source):
    # Two cells (each starts a TensorFlow process): 2 logical-CPU replicas, 1 service worker.
    payload = run("benchmarks.scaling", tmp_path, tiny_source, "--sections=replicas,service",
                  "--replicas=2", "--service_workers=1", "--steps_per_execution=1",
                  "--image_size=32", "--batch_size=8", "--steps=2", "--warmup_steps=1",
                  "--repeats=1", "--shard_mb=0.005")
    cells = payload["cells"]
    assert [(c["kind"], c.get("replicas", 1), c.get("workers", 0)) for c in cells] == [
        ("loop", 2, 0), ("loop", 1, 1)]
    assert not [c for c in cells if "error" in c]
    assert all(c["rate"]["median"] > 0 for c in cells)
    assert cells[0]["replicas_in_sync"] == 2


@pytest.mark.slow
def test_encoding_smoke(tmp_path, tiny_source):
    payload = run("benchmarks.encoding", tmp_path, tiny_source, "--images=6", "--image_size=32")
    assert payload["environment"]["cores"] >= 1
    assert "raw" in (tmp_path / "result.md").read_text()


# float32 only: --precisions=auto adds mixed_bfloat16 on CPUs with AVX512-BF16 or AMX (a row
# more to time); what auto expands to is tested on its own below.
ACCELERATOR = ("--image_size=32", "--batch_size=4", "--steps=2", "--warmup=1", "--windows=1",
               "--rounds=1", "--precisions=float32")


def test_accelerator_auto_precisions_follow_the_device():
    from benchmarks.accelerator import precisions
    assert precisions(["auto"], False, None, False) == ["float32"]
    assert precisions(["auto"], False, None, True) == ["float32", "mixed_bfloat16"]
    assert precisions(["auto"], True, [(7, 5)], False) == ["float32", "mixed_float16"]
    assert precisions(["auto"], True, [(8, 0), (9, 0)], False) == [
        "float32", "mixed_float16", "mixed_bfloat16"]
    assert precisions(["float32"], True, [(9, 0)], True) == ["float32"]


@pytest.mark.slow
def test_accelerator_on_two_logical_cpu_devices_writes_no_gpu_field(tmp_path, tiny_source):
    proc = run_module("benchmarks.accelerator", f"--output_dir={tmp_path}", "--name=result",
                      tiny_source, "--models=manual_cnn", "--strategy=mirrored", *ACCELERATOR,
                      timeout=900, env={"PNEUMO_CPU_DEVICES": "2",
                                        "PNEUMO_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no GPU found: timing the CPU" in proc.stdout
    text = (tmp_path / "result.json").read_text()
    payload = json.loads(text)
    assert payload["replicas"] == 2 and payload["environment"]["device"] == "CPU"
    assert "gpu" not in text.lower().replace("no gpu", "")  # no GPU field, no GPU figure
    (row,) = payload["rows"]
    assert row["device"].startswith(payload["environment"]["cpu"])
    assert set(row["images_per_second"]) == {"memory", "stream", "resident"}
    assert all(v > 0 for v in row["images_per_second"].values())
    assert set(row["input_wait"]) == {"stream", "resident"}
    assert all(0.0 <= v <= 1.0 for v in row["input_wait"].values())
    assert "peak_device_memory_bytes" not in row
    assert "| " in (tmp_path / "result.md").read_text()


@pytest.mark.slow
def test_train_step_stems_in_rounds(tmp_path, tiny_source):
    """Issue 20: bn_cnn's stems timed side by side, the grid repeated in rounds; the other
    networks carry no stem, and bn_cnn's default stem is patch4."""
    payload = run("benchmarks.train_step", tmp_path, tiny_source, "--models=bn_cnn",
                  "--stems=conv,patch4", "--precisions=float32", "--jit=false", "--rounds=2",
                  "--image_size=32", "--batch_size=4", "--steps=1", "--warmup_steps=1",
                  "--repeats=1", "--nopipeline")
    cells = payload["cells"]
    assert [c["stem"] for c in cells] == ["conv", "patch4"]
    assert all(len(c["rounds"]) == 2 for c in cells)
    assert "memory_vs_first_stem" not in cells[0] and cells[1]["memory_vs_first_stem"] > 0
    text = (tmp_path / "result.md").read_text()
    assert "patch4 stem" in text and "load average" in text
    payload = run("benchmarks.train_step", tmp_path, tiny_source, "--models=bn_cnn,manual_cnn",
                  "--precisions=float32", "--jit=false", "--image_size=32", "--batch_size=4",
                  "--steps=1", "--warmup_steps=1", "--repeats=1", "--nopipeline")
    assert [(c["model"], c.get("stem")) for c in payload["cells"]] == \
        [("bn_cnn", "patch4"), ("manual_cnn", None)]


def test_accelerator_strategies_are_the_jobs():
    """Every --strategy the accelerator benchmark offers is one the job's factory builds (its
    default once named one the factory refused)."""
    from benchmarks import accelerator
    from pneumo_models.config import STRATEGIES
    assert set(accelerator.STRATEGIES) <= set(STRATEGIES)
    assert accelerator.FLAGS["strategy"].default in accelerator.STRATEGIES


def test_results_record_paths_beside_the_checkout_relative_to_it(tmp_path):
    from benchmarks import common
    shared = common.REPO.parent / "shared" / "data" / "chest_xray_fullres"
    outside = "/nonexistent-root/data"
    payload = {"source_dir": str(shared), "rows": [{"data_dir": str(common.REPO / "x")}],
               "other": outside, "name": "bn_cnn", "n": 3}
    table = f"| {shared} | {outside} |"
    common.write_results("r", str(tmp_path), payload, table)
    written = json.loads((tmp_path / "r.json").read_text())
    assert written == {"source_dir": "../shared/data/chest_xray_fullres",
                       "rows": [{"data_dir": "x"}], "other": outside, "name": "bn_cnn", "n": 3}
    assert "| ../shared/data/chest_xray_fullres | /nonexistent-root/data |" in (
        tmp_path / "r.md").read_text()
