"""The time-budget planner (issue 20): what to cut, epochs or image size, before training.

The plan's choices are plain arithmetic (pneumo_models.budget, no TensorFlow, fast tier); the
probe that times a throwaway network trains it, so that test is slow."""

import pytest

from pneumo_models import budget


def plan(minutes, step_seconds, **kw):
    args = dict(epochs=12, image_size=150, step_seconds=step_seconds, steps_per_epoch=100,
                val_images=0, batch_size=32)
    args.update(kw)
    return budget.plan_budget(minutes, **args)


def test_a_fast_machine_gets_every_epoch_at_full_size():
    p = plan(13, 0.1)  # 10 s per epoch
    assert (p.image_size, p.epochs) == (150, 12) and "all 12" in p.reason


def test_epochs_above_the_floor_are_cut_first():
    p = plan(13, 1.0)  # 100 s per epoch at 150 px: 7 epochs fit
    assert (p.image_size, p.epochs) == (150, 7)
    assert p.seconds == pytest.approx(700.0)


def test_then_the_image_size_keeps_five_epochs():
    # 150 px: 200 s per epoch, 3 fit in 13 min; 128 px: 200 (128/150)^2 = 145.6 s, 5 fit
    p = plan(13, 2.0)
    assert (p.image_size, p.epochs) == (128, 5) and "128 px" in p.reason
    assert p.epoch_seconds == pytest.approx(200 * (128 / 150) ** 2)


def test_then_epochs_below_the_floor_at_the_smallest_size():
    p = plan(13, 4.0)  # 112 px: 4 * (112/150)^2 * 100 = 223 s per epoch, 3 fit
    assert (p.image_size, p.epochs) == (112, 3) and "even at 112" in p.reason
    assert plan(0.1, 4.0).epochs == 1  # at least one epoch


def test_validation_and_overhead_count():
    fast = plan(13, 1.0)
    slow = plan(13, 1.0, val_images=32 * 30, overhead_seconds=60)  # +10 s per epoch, -60 s
    assert slow.epoch_seconds == pytest.approx(110.0)
    assert slow.epochs == int((780 - 60) // 110) < fast.epochs


def test_when_no_size_keeps_the_floor_the_most_epochs_at_the_largest_size_giving_them():
    # 150 px: 450 s per epoch (1 fits in 780 s); 128 px: 360 s (2); 112 px, fitted a + b s^2:
    # 303.5 s (2 too): 112 px buys no epoch more than 128 px, so 128 px is kept
    p = plan(13, {150: 4.5, 128: 3.6})
    assert budget.step_seconds_at(112, {150: 4.5, 128: 3.6}) * 100 == pytest.approx(303.5,
                                                                                  abs=0.1)
    assert (p.image_size, p.epochs) == (128, 2) and "planned at 128 px" in p.reason


def test_the_planner_imports_no_tensorflow():
    import sys
    assert "pneumo_models.budget" in sys.modules
    source = open(budget.__file__).read()
    assert "import tensorflow" not in source and "import keras" not in source


def test_never_above_the_configured_size_and_at_most_the_epochs_asked():
    p = plan(60, 0.1, image_size=128, epochs=3)
    assert (p.image_size, p.epochs) == (128, 3)
    assert plan(13, 2.0, image_size=192).image_size in (192, 150, 128, 112)
    with pytest.raises(ValueError):
        plan(0, 1.0)


def test_two_measurements_keep_the_cost_that_does_not_shrink_with_the_image():
    one = budget.step_seconds_at(112, {150: 0.45})
    assert one == pytest.approx(0.45 * (112 / 150) ** 2)
    two = budget.step_seconds_at(112, {150: 0.45, 128: 0.40})  # a + b s^2 through both
    b = (0.45 - 0.40) / (150 ** 2 - 128 ** 2)
    assert two == pytest.approx(0.40 - b * (128 ** 2 - 112 ** 2))
    assert two > one
    # the plan sees it: with the fixed part, 112 px no longer buys 5 epochs
    p = plan(13, {150: 2.0, 128: 1.9, 112: 1.85})
    assert (p.image_size, p.epochs) == (128, 4)  # 112 px would buy no epoch more
    assert plan(13, 1.0, margin=1.1).epochs == int(780 // 110)


@pytest.mark.slow  # trains a throwaway network for a few steps
def test_probe_times_steps_of_a_throwaway_model():
    import keras
    import numpy as np

    from pneumo_models import models, optim
    from pneumo_models.config import OptimizerConfig
    from pneumo_models.probe import probe_step_seconds
    model = models.build_model("bn_cnn", image_size=32, weights="none", seed=0)
    images = np.zeros((4, 32, 32, 1), "uint8")
    labels = np.ones((4, 1), "float32")
    before = [w.copy() for w in model.get_weights()]
    seconds, total, first = probe_step_seconds(
        model, images, labels, optim.make_optimizer(OptimizerConfig(), 1e-3),
        keras.losses.BinaryCrossentropy(), steps=2, warmup=1)
    assert 0 < seconds < total and 0 < first < total
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
