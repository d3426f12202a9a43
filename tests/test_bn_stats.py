import keras
import numpy as np
import tensorflow as tf

from pneumo_models import bn_stats


def tiny_model(frozen: bool = False) -> keras.Model:
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(3, 1, name="conv", kernel_initializer="ones")(inputs)
    bn = keras.layers.BatchNormalization(name="bn")
    bn.trainable = not frozen
    x = bn(x)
    outputs = keras.layers.Dense(1, name="head")(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def batches(n: int, size: int = 8) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (n * size, 4, 4, 2)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((x, np.zeros((n * size, 1), np.float32))).batch(
        size)


def test_moving_statistics_become_the_average_over_the_batches_and_momentum_is_restored():
    model = tiny_model()
    bn = model.get_layer("bn")
    assert bn.moving_mean.numpy().tolist() == [0.0, 0.0, 0.0]  # the starting values
    used = bn_stats.recompute(model, batches(5), images=30, batch_size=8)
    assert used == 32  # ceil(30 / 8) = 4 batches of 8
    conv = keras.Model(model.input, model.get_layer("conv").output)
    means, variances = [], []
    for x, _ in batches(4):
        out = conv(x).numpy().reshape(-1, 3)
        means.append(out.mean(axis=0))
        variances.append(out.var(axis=0))
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean(means, axis=0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean(variances, axis=0),
                               rtol=1e-4)
    assert bn.momentum == 0.99
    # the other weights are untouched
    np.testing.assert_array_equal(model.get_layer("conv").get_weights()[0], np.ones((1, 1, 2, 3)))


def test_frozen_batch_norm_and_networks_without_it_are_left_as_they_are():
    frozen = tiny_model(frozen=True)
    before = [w.copy() for w in frozen.get_weights()]
    assert bn_stats.trainable_batch_norms(frozen) == []
    assert bn_stats.recompute(frozen, batches(2), images=16, batch_size=8) == 0
    for a, b in zip(before, frozen.get_weights()):
        np.testing.assert_array_equal(a, b)
    plain = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Flatten(),
                              keras.layers.Dense(1)])
    assert bn_stats.recompute(plain, batches(2), images=16, batch_size=8) == 0
    assert bn_stats.recompute(tiny_model(), batches(2), images=0, batch_size=8) == 0


def test_statistics_are_of_unaugmented_inputs_without_dropout_and_both_come_back():
    from pneumo_data.augment import RandomAffine
    from pneumo_data.config import AugmentConfig
    inputs = keras.Input((4, 4, 2))
    augment = RandomAffine.from_params(AugmentConfig(), seed=1, name="augment")
    x = keras.layers.Conv2D(3, 1, name="conv", kernel_initializer="ones")(augment(inputs))
    dropout = keras.layers.Dropout(0.5, name="dropout")
    x = keras.layers.BatchNormalization(name="bn")(dropout(x))
    model = keras.Model(inputs, x)
    bn_stats.recompute(model, batches(3), images=24, batch_size=8)
    conv = keras.Model(model.input, model.get_layer("conv").output)  # augment inactive here
    expected = np.mean([conv(x).numpy().reshape(-1, 3).mean(axis=0) for x, _ in batches(3)],
                       axis=0)
    np.testing.assert_allclose(model.get_layer("bn").moving_mean.numpy(), expected, rtol=1e-5)
    assert augment.params == AugmentConfig() and dropout.rate == 0.5
