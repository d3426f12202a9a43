import numpy as np
import pytest
import tensorflow as tf

from pneumo_data.augment import RandomAffine, augment_batch, sample_transforms, warp
from pneumo_data.config import AugmentConfig


def batch(n=8, h=24, w=32, seed=0):
    return tf.constant(np.random.default_rng(seed).integers(0, 256, (n, h, w, 1)), tf.uint8)


def test_all_ranges_zero_is_exactly_the_identity():
    x = batch()
    layer = RandomAffine(0, 0, 0, 0, 0, False)
    np.testing.assert_array_equal(layer(x, training=True).numpy(), x.numpy().astype(np.float32))
    np.testing.assert_array_equal(augment_batch(x, AugmentConfig.off(), tf.constant([1, 2])), x)
    # The zero-range matrix is the identity in the warp itself, not only a shortcut.
    t = sample_transforms(8, 24, 32, AugmentConfig.off(), tf.constant([3, 4]))
    for backend in ("kernel", "gather"):
        np.testing.assert_array_equal(warp(tf.cast(x, tf.float32), t, backend).numpy(),
                                      x.numpy().astype(np.float32))


def test_flip_alone_is_an_exact_mirror():
    x = batch(n=64)
    out = RandomAffine(0, 0, 0, 0, 0, True, seed=4)(x, training=True).numpy()
    src = x.numpy().astype(np.float32)
    flipped = [np.array_equal(o, s[:, ::-1]) for o, s in zip(out, src)]
    kept = [np.array_equal(o, s) for o, s in zip(out, src)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48


def test_each_image_gets_its_own_draw():
    one = np.random.default_rng(1).integers(0, 256, (1, 24, 32, 1))
    x = tf.constant(np.repeat(one, 16, axis=0), tf.uint8)
    out = RandomAffine(seed=2)(x, training=True).numpy()
    assert len({o.tobytes() for o in out}) == 16
    host = augment_batch(x, AugmentConfig(), tf.constant([5, 6])).numpy()
    assert len({o.tobytes() for o in host}) == 16


def test_inactive_outside_training_and_works_in_tf_function():
    x = batch()
    layer = RandomAffine(seed=1)
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy().astype(np.float32))
    fn = tf.function(lambda images: layer(images, training=True))
    out = fn(x)
    assert out.shape == x.shape and not np.array_equal(out.numpy(), x.numpy())


def test_gather_backend_matches_kernel_and_compiles_with_xla():
    x = tf.cast(batch(), tf.float32)
    t = sample_transforms(8, 24, 32, AugmentConfig(rotation_deg=30, zoom=0.3), tf.constant([1, 1]))
    kernel = warp(x, t, "kernel").numpy()
    np.testing.assert_allclose(warp(x, t, "gather").numpy(), kernel, atol=1e-3)
    xla = tf.function(lambda images: warp(images, t, "gather"), jit_compile=True)
    np.testing.assert_allclose(xla(x).numpy(), kernel, atol=0.01)


def test_rotation_is_in_degrees():
    # A single bright column at the centre, rotated by at most 15 degrees,
    # stays within tan(15 deg) * half-height of the centre at the top row.
    x = np.zeros((64, 65, 65, 1), np.uint8)
    x[:, :, 32] = 255
    out = augment_batch(tf.constant(x), AugmentConfig(15, 0, 0, 0, 0, False),
                        tf.constant([0, 9])).numpy()
    top_cols = np.array([np.argmax(o[0, :, 0]) for o in out])
    assert np.abs(top_cols - 32).max() <= np.ceil(np.tan(np.radians(15)) * 32) + 1
    assert np.abs(top_cols - 32).max() >= 4


def test_host_and_device_agree_in_distribution():
    """Per-image displacement of a bright blob: same distribution in both places."""
    x = np.zeros((1, 48, 48, 1), np.uint8)
    x[0, 16:24, 30:38] = 255
    x = tf.constant(np.repeat(x, 400, axis=0))
    layer = RandomAffine(seed=3)

    def centroids(images):
        images = np.asarray(images, np.float64)[..., 0]
        ys, xs = np.mgrid[0:48, 0:48]
        mass = images.sum(axis=(1, 2))
        return np.stack([(images * xs).sum(axis=(1, 2)) / mass,
                         (images * ys).sum(axis=(1, 2)) / mass], 1)

    device = centroids(layer(x, training=True).numpy())
    host = centroids(augment_batch(x, AugmentConfig(), tf.constant([7, 8])).numpy())
    from scipy.stats import ks_2samp
    for axis in (0, 1):
        assert ks_2samp(device[:, axis], host[:, axis]).pvalue > 0.01
        assert abs(device[:, axis].std() - host[:, axis].std()) < 0.25 * host[:, axis].std()


@pytest.mark.parametrize("kwargs", [dict(rotation_deg=-1), dict(zoom=1.0),
                                    dict(width_shift=float("nan"))])
def test_invalid_ranges(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)


def test_layer_serializes():
    import keras
    layer = RandomAffine(rotation_deg=5, backend="gather", seed=3)
    clone = RandomAffine.from_config(layer.get_config())
    assert clone.params == layer.params and clone.backend == "gather"
    model = keras.Sequential([keras.Input((8, 8, 1), dtype="uint8"), layer])
    assert isinstance(keras.models.clone_model(model).layers[0], RandomAffine)


def test_ragged_batch_of_different_sizes_gets_per_image_warps():
    small = np.random.default_rng(0).integers(0, 256, (10, 12, 1)).astype(np.uint8)
    tall = np.random.default_rng(1).integers(0, 256, (20, 8, 1)).astype(np.uint8)
    ragged = tf.ragged.stack([tf.constant(small), tf.constant(tall)])
    out = RandomAffine(seed=3)(ragged, training=True)
    assert isinstance(out, tf.RaggedTensor)
    shapes = [tuple(o.to_tensor().shape) if isinstance(o, tf.RaggedTensor) else tuple(o.shape)
              for o in out]
    assert shapes == [(10, 12, 1), (20, 8, 1)]
    # Identity ranges leave each image as it was (the warp uses each image's own size).
    same = RandomAffine(0, 0, 0, 0, 0, False)(ragged, training=True)
    second = same[1].to_tensor() if isinstance(same[1], tf.RaggedTensor) else same[1]
    np.testing.assert_array_equal(second.numpy(), tall.astype(np.float32))
    # A flip-only warp mirrors each image about its own centre.
    flips = RandomAffine(0, 0, 0, 0, 0, True, seed=5)
    for _ in range(4):
        got = flips(ragged, training=True)
        for image, source in zip(got, (small, tall)):
            image = image.to_tensor().numpy() if isinstance(image, tf.RaggedTensor) \
                else image.numpy()
            src = source.astype(np.float32)
            assert np.array_equal(image, src) or np.array_equal(image, src[:, ::-1])


def test_seeded_layers_repeat_their_draws_and_state_is_saved(tmp_path):
    import keras
    x = batch()
    a, b = RandomAffine(seed=0), RandomAffine(seed=0)  # seed 0 is a seed, not "random"
    for _ in range(2):
        np.testing.assert_array_equal(a(x, training=True).numpy(), b(x, training=True).numpy())
    assert not np.array_equal(a(x, training=True).numpy(), RandomAffine(seed=1)(
        x, training=True).numpy())
    model = keras.Sequential([keras.Input((24, 32, 1), dtype="uint8"), RandomAffine(seed=7)])
    model(x, training=True)
    model.save(tmp_path / "m.keras")
    clone = keras.models.load_model(tmp_path / "m.keras")
    # The clone continues the sequence where the original stopped.
    np.testing.assert_array_equal(clone(x, training=True).numpy(), model(x, training=True).numpy())


def test_visualize_writes_a_grid_and_never_replaces_a_users_file(tmp_path):
    from pneumo_data.common.errors import UserError
    from pneumo_data.visualize import VisualizeConfig, visualize
    from tests.conftest import write_image
    image = write_image(tmp_path / "x.png", size=(64, 48))
    out = visualize(VisualizeConfig(image=str(image), output=str(tmp_path / "grid.png"),
                                    image_size=32))
    from PIL import Image
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 300
    visualize(VisualizeConfig(image=str(image), output=str(out), image_size=32, seed=1))
    with pytest.raises(UserError, match="not written by this job"):
        visualize(VisualizeConfig(image=str(image), output=str(image), image_size=32))
