import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from pneumo_data.common.config import leaves, with_leaves
from pneumo_data.common.errors import UserError
from pneumo_data.manifest import ManifestError
from pneumo_models.train import TrainConfig, TrainError, train
from tests.helpers import run_code, run_module


def small(prepared, model_dir, **kw):
    base = dict(data_dir=str(prepared), model_dir=str(model_dir), image_size=32, batch_size=8,
                epochs=2, steps_per_epoch=3, precision="float32", early_stopping_patience=0)
    base.update(kw)
    return with_leaves(TrainConfig(), **base)


def epochs_in(history: Path):
    with open(history) as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def train_killed(config, patch: str, cwd: Path | None = None) -> None:
    """Runs the job on ``config`` in a subprocess after ``patch`` (Python source run first,
    which arranges a SIGKILL); asserts the process was killed."""
    code = (
        "import os, signal\n"
        "from pneumo_data.common.config import with_leaves\n"
        "import pneumo_models.callbacks as cb\n"
        "import pneumo_models.train as t\n"
        f"{patch}"
        f"t.train(with_leaves(t.TrainConfig(), **{leaves(config)!r}))\n")
    proc = run_code(code, cwd=cwd or Path.cwd())
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


KILL_AFTER_SECOND_EPOCH = (
    "original = cb.Resume.on_epoch_end\n"
    "def killer(self, epoch, logs=None):\n"
    "    original(self, epoch, logs)\n"
    "    if epoch == 1:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "cb.Resume.on_epoch_end = killer\n")


@pytest.mark.slow
def test_job_writes_everything_and_second_run_is_noop(prepared, tmp_path):
    run = train(small(prepared, tmp_path / "run"))
    out = tmp_path / "run"
    for name in ("config.json", "config.flags", "history.csv", "best.keras", "model.keras",
                 "run.json"):
        assert (out / name).exists(), name
    assert (out / "export" / "saved_model" / "saved_model.pb").exists()
    assert list((out / "logs").iterdir())
    assert not (out / "resume").exists()
    assert run["precision"] == "float32" and run["jit_compile"] is False
    assert {"auc", "accuracy", "precision", "recall", "loss"} <= set(run["val_metrics"])
    assert epochs_in(out / "history.csv") == [0, 1]
    row = run["history"][0]
    assert row["images_per_second"] > 0 and "val_auc" in row
    assert json.loads((out / "config.json").read_text())["pipeline"]["image_size"] == 32
    stamp = (out / "run.json").stat().st_mtime_ns
    train(small(prepared, tmp_path / "run"))
    assert (out / "run.json").stat().st_mtime_ns == stamp


def test_flagfile_reproduces_the_config(prepared, tmp_path):
    from absl import flags

    from pneumo_data.common.config import config_from_flags, config_to_flagfile, define_flags
    config = small(prepared, tmp_path / "run", model="vgg16", fine_tune_epochs=1)
    values = flags.FlagValues()
    define_flags(TrainConfig, values)
    flagfile = tmp_path / "config.flags"
    flagfile.write_text(config_to_flagfile(config))
    values(["train", f"--flagfile={flagfile}"])
    assert config_from_flags(TrainConfig, values) == config


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
def test_model_dir_with_another_config_is_refused_before_work(prepared, tmp_path):
    train(small(prepared, tmp_path / "run", epochs=1))
    with pytest.raises(TrainError, match="holds another run.*epochs: 1 -> 2"):
        train(small(prepared, tmp_path / "run", epochs=2))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(model="alexnet"), TrainError, "--model must be one of"),
    (dict(batch_size=0), TrainError, "--batch_size must be positive"),
    (dict(image_size=-5), TrainError, "--image_size must be positive"),
    (dict(learning_rate=0.0), TrainError, "learning_rate"),
    (dict(fine_tune_epochs=2), TrainError, "needs a backbone"),
    (dict(weights="/no/such/file.h5"), TrainError, "does not exist"),
])
def test_bad_options_fail_before_any_output(prepared, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        train(small(prepared, tmp_path / "run", **kwargs))
    assert not (tmp_path / "run").exists()


def test_data_dir_without_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        train(TrainConfig(data_dir=str(tmp_path), model_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message(prepared, tmp_path, monkeypatch):
    import keras

    import pneumo_models.training as t

    def nan_loss(y, p):  # one value per example, as the training loop needs
        return keras.ops.mean(y * np.nan + p, axis=-1)

    def nan_compile(model, config, learning_rate, jit):  # the job's optimizer and loss
        model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss=nan_loss)
    monkeypatch.setattr(t, "_compile", nan_compile)
    with pytest.raises(TrainError, match="loss became nan at epoch 1, batch 1"):
        train(small(prepared, tmp_path / "run"))


@pytest.mark.slow
def test_cli_bad_flag_is_a_clear_error(tmp_path):
    proc = run_module("pneumo_models.train", f"--data_dir={tmp_path}",
                      f"--model_dir={tmp_path / 'r'}")
    assert proc.returncode != 0 and "train: error:" in proc.stderr
    assert "no manifest.json" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_job_learns_the_embedded_default_data(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMO_CACHE", str(tmp_path / "cache"))
    run = train(with_leaves(TrainConfig(), model_dir=str(tmp_path / "run"), image_size=64,
                            epochs=6, precision="float32", early_stopping_patience=0, seed=0))
    assert run["val_metrics"]["auc"] > 0.85, run["val_metrics"]


def cli(*args, timeout=600):
    """The training job as a user runs it (no log-level override)."""
    return run_module("pneumo_models.train", *args, timeout=timeout,
                      env={"TF_CPP_MIN_LOG_LEVEL": None})


SMALL_FLAGS = ("--image_size=32", "--batch_size=8", "--epochs=1", "--steps_per_epoch=2",
               "--precision=float32", "--early_stopping_patience=0")


@pytest.mark.slow
def test_a_model_dir_holding_a_users_files_is_refused_untouched(prepared, tmp_path):
    um = tmp_path / "um"
    (um / "export").mkdir(parents=True)
    (um / "resume").mkdir()
    (um / "export" / "important.txt").write_text("x")
    (um / "resume" / "notes.txt").write_text("y")
    (um / "history.csv").write_text("epoch,foo\n5,1\n")
    proc = cli(f"--data_dir={prepared}", f"--model_dir={um}", *SMALL_FLAGS)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "train: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert (um / "export" / "important.txt").read_text() == "x"
    assert (um / "resume" / "notes.txt").read_text() == "y"
    assert (um / "history.csv").read_text() == "epoch,foo\n5,1\n"
    assert sorted(p.name for p in um.iterdir()) == ["export", "history.csv", "resume"]


@pytest.mark.slow
def test_overwrite_replaces_only_the_jobs_own_run(prepared, tmp_path):
    out = tmp_path / "run"
    train(small(prepared, out, epochs=1))
    (out / "my_notes.md").write_text("mine")
    (out / "logs" / "extra.txt").write_text("mine too")
    with pytest.raises(TrainError, match="--overwrite"):
        train(small(prepared, out, epochs=2))
    with pytest.raises(UserError, match="logs holds files pneumo did not write"):
        train(small(prepared, out, epochs=2, overwrite=True))
    (out / "logs" / "extra.txt").unlink()
    run = train(small(prepared, out, epochs=2, overwrite=True))
    assert len(run["history"]) == 2 and (out / "my_notes.md").read_text() == "mine"


@pytest.mark.slow
def test_user_errors_are_one_line_without_traceback(tmp_path):
    proc = cli("--source_dir=/nope", f"--model_dir={tmp_path / 'r'}")
    assert proc.returncode == 1 and "train: error:" in proc.stderr, proc.stderr[-2000:]
    assert "/nope does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
    proc = cli("--model=alexnet", f"--model_dir={tmp_path / 'r'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_empty_val_split_is_refused_before_writing_and_the_fix_then_runs(prepared, tmp_path):
    from pneumo_data.prepare import PrepareConfig, prepare
    from tests.helpers import write_image
    src = tmp_path / "tiny"
    write_image(src / "NORMAL" / "IM-0001-0001.png", value=60)
    write_image(src / "PNEUMONIA" / "person1_virus_1.png", value=200)
    tiny = tmp_path / "tiny_prepared"
    prepare(PrepareConfig(source_dir=str(src), output_dir=str(tiny), image_size=32,
                          progress=False))
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="val split .* is empty"):
        train(small(tiny, out))
    assert not out.exists()
    run = train(small(prepared, out))  # the corrected command, same model_dir
    assert run["val_metrics"]


@pytest.mark.slow
def test_same_seed_and_deterministic_reproduce_the_weights_exactly(prepared, tmp_path):
    import keras

    from pneumo_models.models import load_model
    flags = (f"--data_dir={prepared}", "--seed=3", "--deterministic", "--image_size=32",
             "--batch_size=8", "--epochs=2", "--steps_per_epoch=3", "--precision=float32",
             "--early_stopping_patience=0")
    for name in ("a", "b"):
        proc = cli(f"--model_dir={tmp_path / name}", *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_model(tmp_path / n / "model.keras") for n in ("a", "b"))
    assert len(a.weights) == len(b.weights) > 0
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(wa),
                                      keras.ops.convert_to_numpy(wb), err_msg=wa.path)
    ha = (tmp_path / "a" / "history.csv").read_text().splitlines()
    hb = (tmp_path / "b" / "history.csv").read_text().splitlines()
    drop_timing = [[v for k, v in zip(ha[0].split(","), row.split(","))
                    if k not in ("images_per_second", "epoch_seconds")] for row in ha + hb]
    assert drop_timing[:len(ha)] == drop_timing[len(ha):]


@pytest.mark.slow
def test_job_output_is_quiet(prepared, tmp_path):
    proc = cli(f"--data_dir={prepared}", f"--model_dir={tmp_path / 'r'}", *SMALL_FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("cuInit", "absl::InitializeLog", "oneDNN", "cuda drivers", "shuffle=True",
                  "contains input name", "Traceback", "INFO absl", "fingerprint"):
        assert noise not in proc.stderr + proc.stdout, noise


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
def test_time_budget_plans_the_epochs_that_fit_and_ends_the_schedule_on_them(prepared,
                                                                             tmp_path):
    # A budget smaller than one epoch: one epoch is planned, the cosine ends on its last step.
    run = train(small(prepared, tmp_path / "run", epochs=4, time_budget_minutes=1e-4))
    assert epochs_in(tmp_path / "run" / "history.csv") == [0]
    budget = run["time_budget"]
    assert budget["epochs_planned"] == 1 and len(budget["epoch_seconds"]) == 1
    assert budget["training_seconds"] > 0
    # no budget: every epoch runs
    run = train(small(prepared, tmp_path / "free", epochs=3, time_budget_minutes=0))
    assert epochs_in(tmp_path / "free" / "history.csv") == [0, 1, 2]
    assert run["time_budget"]["epochs_planned"] is None


@pytest.mark.slow
def test_ship_last_or_best(prepared, tmp_path):
    import keras

    from pneumo_models.models import load_model
    for ship in ("last", "best"):
        out = tmp_path / ship
        run = train(small(prepared, out, epochs=3, ship=ship))
        final = load_model(out / "model.keras").get_weights()
        best = load_model(out / "best.keras").get_weights()
        same_as_best = all(np.array_equal(a, b) for a, b in zip(final, best))
        aucs = [row["val_auc"] for row in run["history"]]
        if ship == "best":
            assert same_as_best
        elif int(np.argmax(aucs)) != len(aucs) - 1:  # the last epoch was not the best
            assert not same_as_best
        assert run["ship"] == ship
    keras.backend.clear_session()


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
        "keras.callbacks.EarlyStopping.on_epoch_end = stop\n"
        "import pneumo_models.training as e\n"
        "def killer(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "e.export_into_model_dir = killer\n"))
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["finished"] and state["epoch"] == 0
    assert sorted(p.name for p in (out / "resume").glob("*.weights.h5")) == \
        ["model-p1-e0.weights.h5"]
    run = train(config)
    assert epochs_in(out / "history.csv") == [0] and len(run["history"]) == 1


def test_time_budget_replans_after_the_second_epoch_then_holds(monkeypatch):
    import pneumo_models.callbacks as cb
    from pneumo_models import optim

    clock = iter([0.0, 100.0, 100.0, 150.0, 150.0, 200.0, 200.0, 250.0, 250.0, 300.0])
    monkeypatch.setattr(cb.time, "perf_counter", lambda: next(clock))
    schedule = optim.WarmupCosine(1e-3, warmup_steps=10, total_steps=10 * 10)
    budget = cb.TimeBudget(5.0, epochs=10, steps_per_epoch=10, schedule=schedule)

    class Model:
        stop_training = False
    budget.set_model(Model())
    plans = []
    for epoch in range(5):
        budget.on_epoch_begin(epoch)
        budget.on_epoch_end(epoch)
        plans.append((budget.plan, schedule.total_steps, budget.model.stop_training))
    # 300 s: epoch 1 took 100 s, 200 s left -> 3 epochs; epoch 2 took 50 s, 150 s left ->
    # 5 epochs, final; the run stops after the fifth, the schedule ends there
    assert plans == [(3, 30, False), (5, 50, False), (5, 50, False), (5, 50, False),
                     (5, 50, True)]
    assert budget.record()["training_seconds"] == 300.0


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
def test_config_flags_repeat_the_run_from_any_folder(prepared, tmp_path, monkeypatch):
    """Relative --data_dir and --model_dir are written to config.flags as absolute paths, so
    ``--flagfile=MODEL_DIR/config.flags`` finds the same (complete) run from another folder
    instead of training a new one there."""
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    data = Path(os.path.relpath(prepared, tmp_path / "here"))
    train(small(data, "run", epochs=1))
    flags = (tmp_path / "here" / "run" / "config.flags").read_text().splitlines()
    assert f"--data_dir={os.path.abspath(data)}" in flags
    assert f"--model_dir={tmp_path / 'here' / 'run'}" in flags
    proc = run_module("pneumo_models.train",
                      f"--flagfile={tmp_path / 'here' / 'run' / 'config.flags'}",
                      cwd=tmp_path / "elsewhere", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already holds this complete run; nothing to do" in proc.stderr + proc.stdout
    assert not any((tmp_path / "elsewhere").iterdir())


def _assert_ships_the_average(prepared, out, run):
    """model.keras is the optimizer's moving average (kept in trained.keras's optimizer
    state), not the last trained weights; the export serves it, run.json's val metrics and
    the evaluation job score it."""
    import keras
    import tensorflow as tf

    from pneumo_data import reader
    from pneumo_data.preprocess.model_input_tf import to_model_input
    from pneumo_eval import evaluate as ev
    from pneumo_eval.evaluation import predict_split
    from pneumo_models.models import load_model, predictor
    shipped, trained = load_model(out / "model.keras"), load_model(out / "trained.keras")
    averages = trained.optimizer._model_variables_moving_average  # in trainable order
    assert len(averages) == len(shipped.trainable_weights)
    for weight, average in zip(shipped.trainable_weights, averages):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(weight),
                                   keras.ops.convert_to_numpy(average), rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(a, b) for a, b in
               zip(shipped.get_weights(), trained.get_weights()))
    # the export serves the shipped (averaged) model
    stored = next(iter(reader.eval_dataset(prepared, "val", batch_size=8, image_size=64)))[0]
    served = tf.saved_model.load(str(out / "export" / "saved_model"))
    exported = served.signatures["serve_pixels"](pixels=stored)["probability"].numpy()
    pixels = to_model_input(stored, 32)
    np.testing.assert_allclose(exported, predictor(shipped)(pixels), atol=1e-5)
    assert not np.allclose(exported, predictor(trained)(pixels), atol=1e-5)
    # run.json's val metrics are the shipped model's (history.csv's are the trained weights')
    val = predict_split(shipped, prepared, "val", 16)
    auc = keras.metrics.AUC()
    auc.update_state(val.labels, val.scores)
    assert run["val_metrics"]["auc"] == pytest.approx(float(auc.result()), abs=1e-3)
    assert run["history"][-1]["val_loss"] != pytest.approx(run["val_metrics"]["loss"], abs=1e-7)
    # the evaluation job scores model.keras: the averaged weights' scores
    ev.evaluate(ev.EvaluateConfig(model_dir=(str(out),), bootstrap=10, gradcam_examples=0,
                                  output_dir=str(out / "eval")))
    scores = np.load(out / "eval" / "predictions.npz")["scores"]
    np.testing.assert_allclose(scores, predict_split(shipped, prepared, "test", 16).scores,
                               atol=1e-6)
    assert not np.allclose(scores, predict_split(trained, prepared, "test", 16).scores,
                           atol=1e-6)


@pytest.mark.slow
def test_ema_ships_exports_and_evaluates_the_averaged_weights(prepared, tmp_path):
    """--ema_momentum, streamed input: model.keras, the SavedModel export, run.json's val
    metrics and the evaluation are the moving average's; trained.keras holds the last
    epoch's weights. A run killed after its last epoch (while exporting) ships the average
    too when resumed."""
    out = tmp_path / "ema"
    config = small(prepared, out, epochs=2, ema_momentum=0.5)
    train_killed(config, (
        "import pneumo_models.training as e\n"
        "def killer(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "e.export_into_model_dir = killer\n"))
    assert json.loads((out / "resume" / "state.json").read_text())["finished"]
    run = train(config)  # resumes: no epoch left, the loaded average is shipped
    assert epochs_in(out / "history.csv") == [0, 1]
    assert run["distribution"]["residency"] == "stream"
    _assert_ships_the_average(prepared, out, run)


@pytest.mark.slow
def test_ema_on_the_device_resident_set_ships_the_averaged_weights(prepared, tmp_path):
    """--ema_momentum with --residency=device (the loop's in-step draw): the same."""
    out = tmp_path / "ema"
    run = train(small(prepared, out, epochs=2, ema_momentum=0.5, residency="device"))
    assert run["distribution"]["residency"] == "device"
    _assert_ships_the_average(prepared, out, run)


@pytest.mark.slow
def test_budget_plan_probe_plans_size_and_epochs_before_training(prepared, tmp_path,
                                                                 monkeypatch):
    """--budget_plan=probe: a probe's step time says 2 of 4 epochs fit at 40 px but 4 at a
    smaller size; the job times that size too, trains there and records the plan."""
    from pneumo_models import budget
    from pneumo_models.models import load_model
    real_plan = budget.plan_budget

    def fake_plan(minutes, **kw):  # 3 steps per epoch; as if a step took 10 s at 40 px
        return real_plan(minutes, **{**kw, "step_seconds": 10.0, "overhead_seconds": 0.0,
                                     "margin": 1.0, "sizes": (40, 32), "min_epochs": 4})
    monkeypatch.setattr(budget, "plan_budget", fake_plan)
    # 40 px: 30 s per epoch + 10 s val; 32 px: 19.2 + 6.4 s; 105 s fit 4 epochs at 32 px only
    run = train(small(prepared, tmp_path / "run", image_size=40, epochs=4,
                      time_budget_minutes=105 / 60, budget_plan="probe"))
    record = run["time_budget"]
    assert record["image_size"] == 32 and record["probe"]["epochs"] == 4
    assert record["probe"]["reason"].endswith("4 epochs fit at 32 px")
    assert set(record["probe"]["probe_step_seconds"]) == {"40", "32"}  # both sizes timed
    assert min(record["probe"]["probe_step_seconds"].values()) > 0
    assert record["training_seconds"] >= record["probe"]["probe_seconds"] > 0  # counted
    assert load_model(tmp_path / "run" / "model.keras").inputs[0].shape[1] == 32
    assert epochs_in(tmp_path / "run" / "history.csv") == [0, 1, 2, 3]
    # the job refuses a probe without a budget to plan
    with pytest.raises(TrainError, match="budget_plan=probe"):
        train(small(prepared, tmp_path / "none", budget_plan="probe", time_budget_minutes=0))


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
