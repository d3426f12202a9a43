"""The optimizer, schedule and loss the training job builds (pneumo_models.optim)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from pneumo_data.common.errors import UserError
from pneumo_models import optim
from pneumo_models.config import OptimizerConfig


def rates(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_warmup_then_cosine_to_the_floor_on_the_last_step():
    s = optim.WarmupCosine(2e-3, warmup_steps=10, total_steps=100, floor=0.01)
    got = rates(s, [0, 5, 10, 55, 99, 150])
    np.testing.assert_allclose(got[:3], [2e-5, 2e-5 + 0.5 * (2e-3 - 2e-5), 2e-3], rtol=1e-5)
    mid = 2e-5 + (2e-3 - 2e-5) * 0.5 * (1 + math.cos(math.pi * 45 / 89))
    np.testing.assert_allclose(got[3], mid, rtol=1e-5)
    np.testing.assert_allclose(got[4:], [2e-5, 2e-5], rtol=1e-5)
    assert (np.diff(rates(s, range(10, 100))) <= 0).all()
    # a shorter run (a time budget) ends at the floor on its own last step
    s.set_total_steps(40)
    np.testing.assert_allclose(rates(s, [10, 39]), [2e-3, 2e-5], rtol=1e-5)
    assert s.get_config()["total_steps"] == 40
    constant = optim.WarmupCosine(1e-3, 0, 100, shape="constant")
    np.testing.assert_allclose(rates(constant, [0, 50, 99]), [1e-3] * 3)


def test_schedule_length_is_saved_with_the_model(tmp_path):
    config = OptimizerConfig()
    schedule = optim.schedule_for(config, steps_per_epoch=7, epochs=12)
    assert (schedule.warmup_steps, schedule.total_steps) == (7, 84)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optim.make_optimizer(config, schedule), optim.make_loss(config))
    model.fit(np.zeros((4, 3)), np.zeros((4, 1)), epochs=1, verbose=0)
    schedule.set_total_steps(35)
    model.save(tmp_path / "m.keras")
    clone = keras.models.load_model(tmp_path / "m.keras")
    restored = clone.optimizer._learning_rate
    assert isinstance(restored, optim.WarmupCosine) and restored.total_steps == 35
    assert float(restored(clone.optimizer.iterations)) == pytest.approx(
        float(schedule(clone.optimizer.iterations)))
    assert clone.loss.get_config()["label_smoothing"] == 0.1


def test_adamw_decays_kernels_only():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, x)
    model.get_layer("dense").bias.assign(np.ones(3))
    model.get_layer("bn").gamma.assign(np.full(3, 2.0))
    model.get_layer("bn").beta.assign(np.ones(3))
    before = {v.path: np.array(v.numpy()) for v in model.trainable_variables}
    optimizer = optim.make_optimizer(OptimizerConfig(weight_decay=0.1), 0.5)
    # zero gradients: Adam moves nothing, only the decoupled weight decay acts
    optimizer.apply_gradients([(np.zeros(v.shape, "float32"), v)
                               for v in model.trainable_variables])
    for v in model.trainable_variables:
        if v.path.endswith("kernel"):
            np.testing.assert_allclose(v.numpy(), before[v.path] * (1 - 0.5 * 0.1), rtol=1e-6)
        else:
            np.testing.assert_array_equal(v.numpy(), before[v.path])
    assert isinstance(optim.make_optimizer(OptimizerConfig(optimizer="adam",
                                                           weight_decay=0.0), 1e-3),
                      keras.optimizers.Adam)


def test_label_smoothing_moves_the_targets():
    loss = optim.make_loss(OptimizerConfig(label_smoothing=0.1))
    value = float(loss(np.array([[1.0]]), np.array([[0.95]])))
    assert value == pytest.approx(-(0.95 * math.log(0.95) + 0.05 * math.log(0.05)), rel=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(optimizer="adam"), "weight_decay"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(lr_floor=0.0), "lr_floor"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(warmup_epochs=-1.0), "warmup_epochs"),
])
def test_bad_optimizer_options(kwargs, message):
    with pytest.raises(UserError, match=message):
        OptimizerConfig(**kwargs).validate()


def test_a_run_shortened_below_twice_the_warmup_still_anneals():
    s = optim.WarmupCosine(1e-3, warmup_steps=30, total_steps=300, floor=0.01)
    assert s.effective_warmup() == 30
    s.set_total_steps(20)  # a time budget left fewer steps than the warmup
    assert s.effective_warmup() == 10
    got = rates(s, [0, 10, 19])
    np.testing.assert_allclose(got, [1e-5, 1e-3, 1e-5], rtol=1e-5)
    # built directly at the short length: the same curve (a resumed run rebuilds it so)
    again = optim.WarmupCosine(1e-3, warmup_steps=30, total_steps=20, floor=0.01)
    np.testing.assert_allclose(rates(again, range(20)), rates(s, range(20)), rtol=1e-6)


def test_ema_average_is_written_into_the_weights_at_the_end():
    """--ema_momentum: the optimizer keeps the moving average of the trainable weights and
    finalize_variable_values (the training loop calls it after fit) writes it into them."""
    w = keras.Variable(np.zeros(3, "float32"))
    opt = optim.make_optimizer(OptimizerConfig(optimizer="adam", weight_decay=0.0,
                                               ema_momentum=0.5), 0.1)
    values = []
    for _ in range(4):
        opt.apply([np.ones(3, "float32")], [w])
        values.append(w.numpy().copy())
    expected = values[0]  # the first step copies the weights
    for v in values[1:]:
        expected = 0.5 * expected + 0.5 * v
    opt.finalize_variable_values([w])
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    assert not np.allclose(w.numpy(), values[-1])
    plain = optim.make_optimizer(OptimizerConfig(), 0.1)
    assert not plain.use_ema
    assert optim.make_optimizer(OptimizerConfig(ema_momentum=0.9), 0.1).use_ema  # AdamW too
    with pytest.raises(UserError, match="ema_momentum"):
        OptimizerConfig(ema_momentum=1.0).validate()
