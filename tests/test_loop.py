"""The custom training loop: callbacks as with fit, the job's optimizer and loss objects, exact
validation, and (in a subprocess with two logical CPU devices) what only several replicas show.

Several replicas on this CPU-only machine come from logical CPU devices, which must be
configured before TensorFlow starts: those checks run in one script in a subprocess (one
MirroredStrategy per process: two over the same devices clash in their collective groups).
Training through the job on several replicas is in test_train_distributed.py.
"""

import csv
import json
import textwrap

import numpy as np
import pytest

from tests.helpers import run_code

TWO_REPLICAS = """
import json, os, sys
os.environ["PNEUMO_CPU_DEVICES"] = "2"
from pneumo_models import cluster, distribute
strategy = distribute.make_strategy("mirrored")  # two logical CPU devices
import keras
import numpy as np
import tensorflow as tf
from pneumo_models.loop import LoopError, TrainingLoop
result = {"replicas": strategy.num_replicas_in_sync}


class Moments(keras.metrics.Metric):
    # Sums of w, w*p, w*p^2 and w*y: any example counted twice or missed changes them.
    def __init__(self, name="moments"):
        super().__init__(name=name)
        self.sums = self.add_variable(shape=(4,), initializer="zeros", name="sums")

    def update_state(self, y, p, sample_weight=None):
        w = tf.ones_like(p) if sample_weight is None else tf.reshape(sample_weight, [-1, 1])
        y, p = tf.cast(y, tf.float32), tf.cast(p, tf.float32)
        self.sums.assign_add(tf.stack([tf.reduce_sum(w), tf.reduce_sum(w * p),
                                       tf.reduce_sum(w * p * p), tf.reduce_sum(w * y)]))

    def result(self):
        return self.sums[1]


def dense_model(optimizer):
    with strategy.scope():
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))
        model.compile(optimizer=optimizer(), loss=keras.losses.BinaryCrossentropy())
    return model


# 1. Validation counts every example once: 9 examples in global batches of 4, so the
# last global batch holds 1 example, fewer than the replicas.
rng = np.random.default_rng(2)
x = rng.normal(size=(9, 4)).astype("float32")
y = (rng.uniform(size=(9, 1)) < 0.5).astype("float32")
model = dense_model(lambda: keras.optimizers.SGD(0.1))
loop = TrainingLoop(model, strategy, metrics=lambda: [Moments()])
val = loop.eval_input(
    lambda ctx: tf.data.Dataset.from_tensor_slices((x, y)).shard(
        ctx.num_input_pipelines, ctx.input_pipeline_id).batch(3),
    num_examples=9, batch_size=4)
logs = loop.evaluate(val)
p = model.predict(x, verbose=0)
result["moments"] = loop.val_metrics[1].sums.numpy().tolist()
result["expected_moments"] = [9.0, float(p.sum()), float((p * p).sum()), float(y.sum())]
result["loss"] = logs["loss"]
result["expected_loss"] = float(keras.losses.binary_crossentropy(y, p).numpy().mean())
try:
    loop.evaluate(loop.eval_input(val.dataset_fn, num_examples=10, batch_size=4))
except LoopError as error:
    result["miscount"] = str(error)

# 2. Mixed-precision loss scaling: a non-finite gradient on replica 1 only skips the step
# on every replica (Keras 3.15 alone looks at replica 0 and would apply -inf/NaN).
model = dense_model(lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)))
before = [w.copy() for w in model.get_weights()]
x2 = np.array([[1.0, 2.0, 0, 0], [3.0, 4.0, 0, 0], [np.nan, 1.0, 0, 0], [2.0, 1.0, 0, 0]],
              "float32")
y2 = np.array([[1.0], [0.0], [1.0], [0.0]], "float32")
loop = TrainingLoop(model, strategy)


def stream(x, y):  # per-replica batches of 2 go to the replicas in turn
    return lambda ctx: tf.data.Dataset.from_tensor_slices((x, y)).batch(2, True).repeat()


loop.fit(stream(x2, y2), batch_size=4, steps_per_epoch=1, epochs=1)
result["skipped"] = all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
result["scale_after_bad"] = float(model.optimizer.dynamic_scale.numpy())
result["initial_scale"] = float(model.optimizer.initial_scale)
loop.fit(stream(np.nan_to_num(x2, nan=0.5), y2), batch_size=4, steps_per_epoch=1, epochs=1)
result["moved"] = any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
result["finite"] = bool(all(np.isfinite(w).all() for w in model.get_weights()))
result["divergence"] = cluster.replica_divergence(strategy, model.weights)
kernel = model.weights[0]
kernel.value.values[1].assign(kernel.value.values[1] + 0.25)  # one replica's copy only
result["divergence_after_poke"] = cluster.replica_divergence(strategy, model.weights)

# 3. Device augmentation draws its own transforms on each replica.
from pneumo_data.augment import RandomAffine
with strategy.scope():
    layer = RandomAffine(seed=3)
    layer.build((None, 32, 32, 1))
image = np.arange(32 * 32, dtype="float32").reshape(1, 32, 32, 1) % 251
same = strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensors(np.repeat(image, 4, 0)).repeat().unbatch().batch(4))
out = strategy.run(tf.function(lambda v: layer(v, training=True)), args=(next(iter(same)),))
first, second = (t.numpy() for t in strategy.experimental_local_results(out))
result["same_draws_on_both_replicas"] = bool(np.array_equal(first, second))
print(json.dumps(result))
"""


@pytest.mark.slow
def test_what_two_replicas_show():
    proc = run_code(textwrap.dedent(TWO_REPLICAS), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["replicas"] == 2
    np.testing.assert_allclose(r["moments"], r["expected_moments"], rtol=1e-5)
    assert r["loss"] == pytest.approx(r["expected_loss"], rel=1e-5)
    assert "counted 9 examples, expected 10" in r["miscount"]
    assert r["skipped"] and r["scale_after_bad"] == r["initial_scale"] / 2
    assert r["moved"] and r["finite"]
    assert r["divergence"] == 0.0 and r["divergence_after_poke"] == pytest.approx(0.25)
    assert not r["same_draws_on_both_replicas"]


# ---------------------------------------------------------------- one device, in process

def _one_device_model(strategy, nan=False, optimizer=None, loss=None):
    import keras
    with strategy.scope():
        inputs = keras.Input((32, 32, 1), dtype="uint8")
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(4, 3, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        if nan:
            x = keras.layers.Lambda(lambda t: t * float("nan"))(x)
        outputs = keras.layers.Dense(1, activation="sigmoid")(x)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=optimizer() if optimizer else keras.optimizers.Adam(1e-2),
                      loss=loss or keras.losses.BinaryCrossentropy())
    return model


def _inputs(loop, prepared, batch=8):
    import pneumo_data
    val = loop.eval_input(
        lambda ctx: pneumo_data.eval_dataset(prepared, "val", batch_size=batch, image_size=32,
                                             input_context=ctx),
        num_examples=pneumo_data.eval_size(prepared, "val"), batch_size=batch)

    def train_fn(ctx):
        return pneumo_data.train_dataset(prepared, batch_size=batch, image_size=32, seed=0,
                                         augment="none", input_context=ctx)
    return train_fn, val


@pytest.mark.slow
def test_standard_and_pneumo_callbacks_work_unchanged(prepared, tmp_path):
    import keras

    from pneumo_models import distribute
    from pneumo_models.callbacks import NaNGuard, Throughput
    from pneumo_models.loop import TrainingLoop

    strategy = distribute.make_strategy("one_device")
    model = _one_device_model(strategy)
    loop = TrainingLoop(model, strategy, steps_per_execution=3)
    train_fn, val = _inputs(loop, prepared)

    class Calls(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.calls = []

        def on_train_begin(self, logs=None):
            self.calls.append("train_begin")

        def on_epoch_begin(self, epoch, logs=None):
            self.calls.append(f"epoch_begin {epoch}")

        def on_train_batch_end(self, batch, logs=None):
            self.calls.append(f"batch_end {batch} {sorted(logs)}")

        def on_test_begin(self, logs=None):
            self.calls.append("test_begin")

        def on_epoch_end(self, epoch, logs=None):
            self.calls.append(f"epoch_end {epoch} {sorted(logs)}")

    calls, guard = Calls(), NaNGuard()
    callbacks = [  # calls last: it sees the logs after Throughput added its keys
        Throughput(8), guard,
        keras.callbacks.CSVLogger(str(tmp_path / "history.csv")),
        keras.callbacks.TensorBoard(str(tmp_path / "logs")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_auc",
                                        mode="max", save_best_only=True),
        calls,
    ]
    history = loop.fit(train_fn, batch_size=8, steps_per_epoch=5, epochs=2, validation=val,
                       callbacks=callbacks)
    assert history.epoch == [0, 1] and guard.where is None
    assert int(model.optimizer.iterations.numpy()) == 10
    train_keys = ["accuracy", "auc", "loss", "precision", "recall"]
    # steps_per_execution=3 over 5 steps: two executions (3 + 2), batch ends at 2 and 4.
    assert calls.calls[:5] == ["train_begin", "epoch_begin 0", f"batch_end 2 {train_keys}",
                               f"batch_end 4 {train_keys}", "test_begin"]
    epoch_end = [c for c in calls.calls if c.startswith("epoch_end 0")][0]
    for key in ("val_auc", "val_loss", "images_per_second", "epoch_seconds", "auc"):
        assert f"'{key}'" in epoch_end
    with open(tmp_path / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["0", "1"] and float(rows[0]["images_per_second"]) > 0
    assert (tmp_path / "best.keras").exists() and list((tmp_path / "logs").rglob("events.*"))
    best = keras.models.load_model(tmp_path / "best.keras")
    assert best.optimizer is not None and int(best.optimizer.iterations.numpy()) in (5, 10)


@pytest.mark.slow
def test_the_loop_uses_the_optimizer_and_loss_objects_it_is_given(prepared):
    import keras

    from pneumo_models import distribute
    from pneumo_models.loop import LoopError, TrainingLoop

    strategy = distribute.make_strategy("one_device")
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [1e-2, 1e-4])
    model = _one_device_model(strategy, optimizer=lambda: keras.optimizers.SGD(schedule))
    loop = TrainingLoop(model, strategy, optimizer=model.optimizer, loss=model.loss)
    train_fn, val = _inputs(loop, prepared)
    loop.fit(train_fn, batch_size=8, steps_per_epoch=3, epochs=1)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-4)  # the schedule
    # Label smoothing is the loss object's business: the same model, a different loss value.
    plain = loop.evaluate(val)["loss"]
    smooth = TrainingLoop(model, strategy, loss=keras.losses.BinaryCrossentropy(
        label_smoothing=0.4)).evaluate(val)["loss"]
    assert plain != pytest.approx(smooth, rel=1e-3)
    with strategy.scope():
        other = keras.optimizers.Adam(1e-3)
    with pytest.raises(LoopError, match="compiled with another optimizer"):
        TrainingLoop(model, strategy, optimizer=other)
    # Given the optimizer that compile wrapped for loss scaling, the loop uses the wrapper.
    scaled = _one_device_model(strategy, optimizer=lambda: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1)))
    inner = scaled.optimizer.inner_optimizer
    assert TrainingLoop(scaled, strategy, optimizer=inner).optimizer is scaled.optimizer
    with pytest.raises(LoopError, match=r"shape \[\] for a batch of 2; .* one value per example"):
        TrainingLoop(model, strategy, loss=lambda y, p: keras.ops.mean(y - p))


@pytest.mark.slow
def test_early_stopping_and_nan_guard_stop_the_loop(prepared):
    import keras

    from pneumo_models import distribute
    from pneumo_models.callbacks import NaNGuard
    from pneumo_models.loop import TrainingLoop

    strategy = distribute.make_strategy("one_device")
    loop = TrainingLoop(_one_device_model(strategy, nan=True), strategy)
    train_fn, val = _inputs(loop, prepared)
    guard = NaNGuard()
    history = loop.fit(train_fn, batch_size=8, steps_per_epoch=4, epochs=3, validation=val,
                       callbacks=[guard])
    assert guard.where == (1, 1, guard.where[2]) and np.isnan(guard.where[2])
    assert history.epoch == [0]

    model = _one_device_model(strategy)
    loop = TrainingLoop(model, strategy)
    train_fn, val = _inputs(loop, prepared)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=0,
                                            min_delta=1e9)  # no epoch is ever an improvement
    history = loop.fit(train_fn, batch_size=8, steps_per_epoch=2, epochs=5, validation=val,
                       callbacks=[stopper])
    assert history.epoch == [0, 1] and stopper.stopped_epoch == 1


def test_validation_shares_must_add_up(prepared):
    import pneumo_data
    from pneumo_models import distribute
    from pneumo_models.loop import LoopError, TrainingLoop

    strategy = distribute.make_strategy("one_device")
    loop = TrainingLoop(_one_device_model(strategy), strategy)
    n = pneumo_data.eval_size(prepared, "val")
    fn = _inputs(loop, prepared)[1].dataset_fn
    good = loop.eval_input(fn, num_examples=n, batch_size=8, shares=lambda p: [n])
    assert set(loop.evaluate(good)) >= {"loss", "auc"}
    bad = loop.eval_input(fn, num_examples=n, batch_size=8, shares=lambda p: [n - 1])
    with pytest.raises(LoopError, match=rf"shares\(1\) gave \[{n - 1}\]"):
        loop.evaluate(bad)
    assert pneumo_data.eval_shares(prepared, "val", 3) == [len(range(i, n, 3)) for i in range(3)]
    assert sum(pneumo_data.eval_shares(prepared, "val", 2, shard="files")) == n


def test_inputs_and_models_the_loop_refuses(prepared):
    import keras
    import tensorflow as tf

    from pneumo_models import distribute
    from pneumo_models.loop import LoopError, TrainingLoop

    strategy = distribute.make_strategy("one_device")
    with strategy.scope():
        inputs = keras.Input((4,))
        inside = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    with pytest.raises(LoopError, match="fit needs an optimizer"):
        TrainingLoop(inside, strategy).fit(lambda ctx: None, batch_size=1, steps_per_epoch=1,
                                           epochs=1)
    inputs = keras.Input((4,))
    outside = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    with pytest.raises(LoopError, match="outside this strategy's scope"):
        TrainingLoop(outside, strategy)
    outside.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(LoopError, match="outside this strategy's scope"):
        TrainingLoop(outside, strategy)
    loop = TrainingLoop(_one_device_model(strategy), strategy)
    with pytest.raises(LoopError, match="steps_per_execution"):
        TrainingLoop(loop.model, strategy, steps_per_execution=0)
    train_fn, val = _inputs(loop, prepared, batch=8)
    with pytest.raises(LoopError, match="batches of 8; each of the 1 replicas needs 4"):
        loop.fit(train_fn, batch_size=4, steps_per_epoch=1, epochs=1)
    with pytest.raises(LoopError, match="class_weight keys"):
        TrainingLoop(loop.model, strategy, class_weight={1: 2.0})
    not_pairs = loop.eval_input(lambda ctx: tf.data.Dataset.range(3).batch(2),
                                num_examples=3, batch_size=2)
    with pytest.raises(LoopError, match=r"must yield \(x, y\) batches"):
        loop.evaluate(not_pairs)
