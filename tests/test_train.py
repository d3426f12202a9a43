import json
import os
from pathlib import Path

import numpy as np
import pytest

from pneumo_data.common.config import with_leaves
from pneumo_data.common.errors import UserError
from pneumo_data.manifest import ManifestError
from pneumo_models.train import TrainConfig, TrainError, train
from tests.helpers import run_module
from tests.train_runs import KILL_WHILE_EXPORTING, epochs_in, small, train_killed


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
               "--precision=float32", "--early_stopping_patience=0", "--bn_stats_images=128")


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
def test_same_seed_and_deterministic_reproduce_the_weights_exactly_and_quietly(prepared,
                                                                               tmp_path):
    import keras

    from pneumo_models.models import load_model
    flags = (f"--data_dir={prepared}", "--seed=3", "--deterministic", "--image_size=32",
             "--batch_size=8", "--epochs=2", "--steps_per_epoch=3", "--precision=float32",
             "--early_stopping_patience=0")
    for name in ("a", "b"):
        proc = cli(f"--model_dir={tmp_path / name}", *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # As a user sees it (no log-level override): none of TensorFlow's start-up noise.
        for noise in ("cuInit", "absl::InitializeLog", "oneDNN", "cuda drivers",
                      "shuffle=True", "contains input name", "Traceback", "INFO absl",
                      "fingerprint"):
            assert noise not in proc.stderr + proc.stdout, noise
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
        shipped, kept = load_model(out / "model.keras"), load_model(out / "best.keras")
        final = [w.numpy() for w in shipped.trainable_weights]
        best = [w.numpy() for w in kept.trainable_weights]
        same_as_best = all(np.array_equal(a, b) for a, b in zip(final, best))
        aucs = [row["val_auc"] for row in run["history"]]
        if ship == "best":
            assert same_as_best
            # ... with the batch-norm statistics recomputed for them (--bn_stats_images)
            moving = [(a.numpy(), b.numpy()) for a, b in
                      zip(shipped.non_trainable_weights, kept.non_trainable_weights)
                      if "moving" in a.path]
            assert moving and not any(np.allclose(a, b) for a, b in moving)
        elif int(np.argmax(aucs)) != len(aucs) - 1:  # the last epoch was not the best
            assert not same_as_best
        assert run["ship"] == ship
    keras.backend.clear_session()


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
    train_killed(config, KILL_WHILE_EXPORTING)
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

