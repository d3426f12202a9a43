"""The training job with ``--residency``: the device-resident train split drawn inside the
step (learns, resumes its walk after a kill), under MirroredStrategy, and the fallback to the
stream with a one-line reason."""

import json

import pytest

from pneumo_models.train import train
from tests.helpers import run_module
from tests.train_runs import KILL_AFTER_SECOND_EPOCH, epochs_in, small, train_killed


@pytest.mark.slow
def test_resident_run_learns_and_resumes_its_walk_after_a_kill(prepared, tmp_path):
    out = tmp_path / "run"
    config = small(prepared, out, epochs=3, steps_per_epoch=6, residency="device",
                   augment="none", learning_rate=3e-3, seed=1)
    train_killed(config, KILL_AFTER_SECOND_EPOCH)
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["epoch"] == 1 and state["resident"]["step"] == 2 * 6
    run = train(config)
    assert epochs_in(out / "history.csv") == [0, 1, 2]
    assert run["distribution"]["residency"] == "device"
    losses = [row["loss"] for row in run["history"]]
    assert losses[-1] < losses[0], losses
    assert run["val_metrics"]["auc"] > 0.7, run["val_metrics"]


@pytest.mark.slow
def test_residency_falls_back_to_the_stream_with_a_one_line_reason(prepared, tmp_path):
    run = train(small(prepared, tmp_path / "run", epochs=1, steps_per_epoch=2,
                      residency="device", residency_budget_mb=0.001))
    reason = run["distribution"]["residency"]
    assert reason.startswith("stream (") and "budget" in reason and "\n" not in reason


@pytest.mark.slow
def test_resident_run_under_two_mirrored_replicas_through_the_job(prepared, tmp_path):
    proc = run_module("pneumo_models.train", f"--data_dir={prepared}",
                      f"--model_dir={tmp_path / 'run'}", "--strategy=mirrored",
                      "--residency=device", "--deterministic", "--image_size=32",
                      "--batch_size=8", "--epochs=1", "--steps_per_epoch=3",
                      "--precision=float32", "--early_stopping_patience=0",
                      env={"PNEUMO_CPU_DEVICES": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["distribution"]["replicas"] == 2
    assert run["distribution"]["residency"] == "device"
