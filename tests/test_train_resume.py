"""Training runs killed and resumed: from the last epoch, with the optimizer state, with a
phase that stopped early, under other spellings of its paths, with a probe's plan."""

import json
from pathlib import Path

import numpy as np
import pytest

from pneumo_models.train import TrainError, train
from tests.train_runs import (
    KILL_AFTER_SECOND_EPOCH,
    KILL_WHILE_EXPORTING,
    epochs_in,
    small,
    train_killed,
)


@pytest.mark.slow
def test_resume_after_kill_continues_from_last_epoch(prepared, tmp_path):
    out = tmp_path / "run"
    config = small(prepared, out, epochs=3)
    train_killed(config, KILL_AFTER_SECOND_EPOCH)
    assert json.loads((out / "resume" / "state.json").read_text())["epoch"] == 1
    assert not (out / "run.json").exists()
    # A row of an epoch that will run again (killed after the CSV, before the state).
    with open(out / "history.csv", "a") as handle:
        handle.write("2" + ",0" * (len(open(out / "history.csv").readline().split(",")) - 1) + "\n")
    run = train(config)
    assert epochs_in(out / "history.csv") == [0, 1, 2]  # epoch 3 only, once
    assert len(run["history"]) == 3


@pytest.mark.slow
def test_resume_restores_the_optimizer_state_under_mixed_float16(prepared, tmp_path,
                                                                  monkeypatch):
    """The loss-scaling wrapper, AdamW's step count, moments and weight-decay exclusions and
    the schedule survive a kill: the resumed run continues the optimizer, not a fresh one."""
    out = tmp_path / "run"
    config = small(prepared, out, epochs=3, precision="mixed_float16")
    import pneumo_models.callbacks as cb
    train_killed(config, KILL_AFTER_SECOND_EPOCH)
    seen = {}
    original = cb.Throughput.on_epoch_begin

    def spy(self, epoch, logs=None):
        if "iterations" not in seen:
            wrapper = self.model.optimizer
            inner = wrapper.inner_optimizer
            seen.update(
                wrapper=type(wrapper).__name__, inner=type(inner).__name__,
                iterations=int(inner.iterations.numpy()),
                moments=float(sum(np.abs(v.numpy()).sum() for v in inner.variables[1:])),
                excluded=inner._exclude_from_weight_decay_pattern is not None,
                rate=float(inner._learning_rate(inner.iterations)))
        original(self, epoch, logs)
    monkeypatch.setattr(cb.Throughput, "on_epoch_begin", spy)
    train(config)
    assert seen["wrapper"] == "LossScaleOptimizer" and seen["inner"] == "AdamW"
    assert seen["iterations"] == 2 * 3  # two epochs of three steps before the kill
    assert seen["moments"] > 0 and seen["excluded"]
    from pneumo_models import optim
    expected = optim.schedule_for(config.optimizer, 3, 3)(6)
    assert seen["rate"] == pytest.approx(float(expected), rel=1e-5)
    assert epochs_in(out / "history.csv") == [0, 1, 2]


@pytest.mark.slow
def test_a_phase_that_stopped_early_is_not_trained_again_after_a_kill(prepared, tmp_path):
    """Early stopping ended phase 1 after its first epoch; the job was killed while saving
    the final model. The resumed job finishes that run; it does not train more epochs."""
    out = tmp_path / "run"
    config = small(prepared, out, epochs=4, early_stopping_patience=1)
    train_killed(config, (
        "import keras\n"
        "def stop(self, epoch, logs=None):\n"
        "    self.model.stop_training = True\n"
        "keras.callbacks.EarlyStopping.on_epoch_end = stop\n" + KILL_WHILE_EXPORTING))
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["finished"] and state["epoch"] == 0
    assert sorted(p.name for p in (out / "resume").glob("*.weights.h5")) == \
        ["model-p1-e0.weights.h5"]
    run = train(config)
    assert epochs_in(out / "history.csv") == [0] and len(run["history"]) == 1


@pytest.mark.slow
def test_a_run_resumes_under_other_spellings_of_its_paths_and_after_a_move(prepared, tmp_path,
                                                                          monkeypatch):
    import shutil
    monkeypatch.chdir(tmp_path)
    shutil.copytree(prepared, "data")
    config = small("data", "run", epochs=3)  # relative paths, as typed
    train_killed(config, KILL_AFTER_SECOND_EPOCH)
    assert not Path("run/run.json").exists()
    # The same folders as absolute paths, the run folder moved: it resumes (not "another run").
    shutil.move("run", "moved")
    run = train(small(tmp_path / "data", tmp_path / "moved", epochs=3))
    assert epochs_in(tmp_path / "moved" / "history.csv") == [0, 1, 2]
    assert len(run["history"]) == 3
    # The data folder moved too: the run is found complete by its data's identity.
    shutil.move("data", "data2")
    again = train(small(tmp_path / "data2", tmp_path / "moved", epochs=3))
    assert again["history"] == run["history"]
    # Other options are still another run.
    with pytest.raises(TrainError, match="--overwrite"):
        train(small(tmp_path / "data2", tmp_path / "moved", epochs=4))


@pytest.mark.slow
def test_a_probe_plan_survives_a_kill(prepared, tmp_path):
    """The planned size and the probe's plan are saved with the resume state: the resumed
    run trains on at that size (no second probe) and run.json records the first plan."""
    out = tmp_path / "run"
    config = small(prepared, out, image_size=40, epochs=4, time_budget_minutes=105 / 60,
                   budget_plan="probe")
    train_killed(config, (
        "from pneumo_models import budget\n"
        "real_plan = budget.plan_budget\n"
        "budget.plan_budget = lambda minutes, **kw: real_plan(minutes, **{**kw, "
        "'step_seconds': 10.0, 'overhead_seconds': 0.0, 'margin': 1.0, 'sizes': (40, 32), "
        "'min_epochs': 4})\n" + KILL_AFTER_SECOND_EPOCH))
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["image_size"] == 32 and state["probe"]["epochs"] == 4
    run = train(config)
    assert run["time_budget"]["image_size"] == 32
    assert run["time_budget"]["probe"] == state["probe"]
    assert epochs_in(out / "history.csv") == [0, 1, 2, 3]
    from pneumo_models.models import load_model
    assert load_model(out / "model.keras").inputs[0].shape[1] == 32
