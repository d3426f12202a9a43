import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from pneumo_data.augment import (
    N_AFFINE,
    RandomAffine,
    apply_intensity,
    augment_batch,
    sample_draws,
    sample_transforms,
    warp,
)
from pneumo_data.config import INTENSITY_FIELDS, AugmentConfig

INTENSITY_OFF = dict.fromkeys(INTENSITY_FIELDS, 0.0)


def batch(n=8, h=24, w=32, seed=0):
    return tf.constant(np.random.default_rng(seed).integers(0, 256, (n, h, w, 1)), tf.uint8)


def test_all_ranges_zero_is_exactly_the_identity():
    x = batch()
    layer = RandomAffine(0, 0, 0, 0, 0, False)
    np.testing.assert_array_equal(layer(x, training=True).numpy(), x.numpy().astype(np.float32))
    np.testing.assert_array_equal(augment_batch(x, AugmentConfig.off(), tf.constant([1, 2])), x)
    every_zero = RandomAffine.from_params(AugmentConfig.off(), seed=1)
    np.testing.assert_array_equal(every_zero(x, training=True).numpy(),
                                  x.numpy().astype(np.float32))
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_host_and_device_agree_in_distribution():
    """Per-image displacement of a bright blob: same distribution in both places."""
    x = np.zeros((1, 48, 48, 1), np.uint8)
    x[0, 16:24, 30:38] = 255
    x = tf.constant(np.repeat(x, 400, axis=0))
    layer = RandomAffine.from_params(AugmentConfig(), seed=3)  # affine and intensity

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


@pytest.mark.slow
def test_visualize_writes_a_grid_and_never_replaces_a_users_file(tmp_path):
    from pneumo_data.common.errors import UserError
    from pneumo_data.visualize import VisualizeConfig, visualize
    from tests.helpers import write_image
    image = write_image(tmp_path / "x.png", size=(64, 48))
    out = visualize(VisualizeConfig(image=str(image), output=str(tmp_path / "grid.png"),
                                    image_size=32))
    from PIL import Image
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 300
    visualize(VisualizeConfig(image=str(image), output=str(out), image_size=32, seed=1))
    with pytest.raises(UserError, match="not written by this job"):
        visualize(VisualizeConfig(image=str(image), output=str(image), image_size=32))


# ---------------------------------------------------------------- intensity transforms

def smooth_batch(n=16, h=40, w=48, seed=0):
    """Images with structure (a gradient, a disc) and some texture, values 20..230."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    base = 40 + 150 * xs / w + 40 * (((ys - h / 2) ** 2 + (xs - w / 3) ** 2) < (h / 4) ** 2)
    images = base[None] + rng.normal(0, 5, (n, h, w))
    return tf.constant(np.clip(np.round(images), 0, 255)[..., None].astype(np.uint8))


def only(**intensity):
    """Affine off, the given intensity transforms on."""
    return AugmentConfig(0, 0, 0, 0, 0, False, **{**INTENSITY_OFF, **intensity})


ONE_AT_A_TIME = [dict(gamma=0.5), dict(contrast=0.4), dict(brightness_levels=25.0),
                 dict(blur_sigma=0.03, blur_probability=1.0), dict(noise_levels=6.0)]


@pytest.mark.parametrize("kwargs", ONE_AT_A_TIME)
def test_each_intensity_transform_gives_each_image_its_own_draw(kwargs):
    x = tf.constant(np.repeat(smooth_batch(1).numpy(), 16, axis=0))
    out = RandomAffine.from_params(only(**kwargs), seed=2)(x, training=True).numpy()
    # (a blur of sigma near 0 leaves an image as it was, so two such draws may coincide)
    assert len({o.tobytes() for o in out}) >= (14 if "blur_sigma" in kwargs else 16)
    assert out.min() >= 0 and out.max() <= 255
    host = augment_batch(x, only(**kwargs), tf.constant([5, 6])).numpy()
    assert len({o.tobytes() for o in host}) > 8 and host.dtype == np.uint8


@pytest.mark.parametrize("kwargs", ONE_AT_A_TIME)
def test_a_zero_factor_is_the_identity(kwargs):
    x = smooth_batch()
    name = next(iter(kwargs))
    zero = only(**{**kwargs, name: 0.0})
    assert zero.intensity_is_identity
    np.testing.assert_array_equal(RandomAffine.from_params(zero, seed=1)(x, training=True),
                                  x.numpy().astype(np.float32))
    # The transform's own arithmetic at its identity draw changes nothing either (not only
    # the shortcut): gamma 1, contrast 1, offset 0, sigma 0, noise std 0.
    draws = sample_draws(16, only(**kwargs), tf.constant([1, 2])).numpy()
    draws[:, N_AFFINE:N_AFFINE + 5] = [1.0, 1.0, 0.0, 0.0, 0.0]
    out = apply_intensity(tf.cast(x, tf.float32), tf.constant(draws), only(**kwargs)).numpy()
    np.testing.assert_allclose(out, x.numpy(), atol=2e-4)


def test_intensity_units():
    x = smooth_batch(64)
    f = x.numpy().astype(np.float64)
    seed = tf.constant([3, 4])
    # brightness: one offset per image, within U(-b, b) grey levels (where nothing clips)
    out = RandomAffine.from_params(only(brightness_levels=25.0), seed=1)(x, training=True).numpy()
    offsets = (out - f).reshape(64, -1)
    inside = (f.reshape(64, -1) > 30) & (f.reshape(64, -1) < 225)
    per_image = np.array([np.median(o[m]) for o, m in zip(offsets, inside)])
    assert all(np.ptp(o[m]) < 1e-3 for o, m in zip(offsets, inside))
    assert np.abs(per_image).max() <= 25 and np.abs(per_image).max() > 15
    # contrast: the standard deviation scales by c in [1/1.4, 1.4], the mean stays
    out = augment_float_only(x, only(contrast=0.4), seed)
    ratio = out.std(axis=(1, 2, 3)) / f.std(axis=(1, 2, 3))
    assert 1 / 1.4 - 0.02 < ratio.min() and ratio.max() < 1.4 + 0.02 and ratio.max() > 1.2
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), f.mean(axis=(1, 2, 3)), atol=1.0)
    # gamma: 255 (x/255)^g, g in [1/1.5, 1.5], one g per image
    out = augment_float_only(x, only(gamma=0.5), seed)
    level = f[:, 0, -1, 0]  # a bright pixel of each image
    g = np.log(out[:, 0, -1, 0] / 255) / np.log(level / 255)
    assert (g > 1 / 1.5 - 0.01).all() and (g < 1.5 + 0.01).all() and np.ptp(g) > 0.3
    expected = 255 * (f / 255) ** g[:, None, None, None]
    np.testing.assert_allclose(out, expected, atol=0.05)
    # noise: std drawn per image from U(0, n) grey levels
    flat = tf.constant(np.full((200, 32, 32, 1), 128, np.uint8))
    out = augment_float_only(flat, only(noise_levels=6.0), seed)
    stds = (out - 128).std(axis=(1, 2, 3))
    assert stds.max() < 6.5 and stds.min() < 1 and 2.5 < stds.mean() < 3.5
    # blur: with probability p, a Gaussian of sigma U(0, s) x side; it smooths and keeps the mean
    params = only(blur_sigma=0.05, blur_probability=0.5)
    out = augment_float_only(x, params, seed)
    sigma = sample_draws(64, params, seed).numpy()[:, N_AFFINE + 3]
    assert sigma.max() <= 0.05
    changed = sigma > 0.01  # over 0.4 px: visibly blurred
    assert 16 < (sigma > 0).sum() < 48 and changed.sum() > 8
    rough = np.abs(np.diff(f, axis=2)).mean(axis=(1, 2, 3))
    smooth = np.abs(np.diff(out, axis=2)).mean(axis=(1, 2, 3))
    assert (smooth[changed] < rough[changed]).all()
    np.testing.assert_array_equal(out[sigma == 0], f[sigma == 0])  # not blurred: exact


@pytest.mark.parametrize("backend", ["kernel", "gather"])
def test_a_batch_in_which_no_image_drew_a_blur_passes_unblurred(backend):
    """The kernel path blurs only the images that drew a blur; when none did, it must not run
    a convolution on an empty batch (oneDNN's depthwise kernel refuses its zero-channel
    filter on Intel CPUs, which crashed training on batches without a blurred image)."""
    x = tf.cast(smooth_batch(4), tf.float32)[..., :1]
    rare = AugmentConfig(blur_sigma=0.05, blur_probability=1e-9)
    assert rare.blurs
    plain = dataclasses.replace(rare, blur_sigma=0.0)

    @tf.function
    def run(layer):
        return layer(x, training=True)

    out = run(RandomAffine.from_params(rare, seed=3, backend=backend)).numpy()
    expected = run(RandomAffine.from_params(plain, seed=3, backend=backend)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-3)  # the graphs differ: float rounding


def augment_float_only(x, params, seed):
    draws = sample_draws(tf.shape(x)[0], params, seed)
    return apply_intensity(tf.cast(x, tf.float32), draws, params).numpy().astype(np.float64)


def test_blur_matches_a_direct_convolution():
    from scipy.ndimage import gaussian_filter1d
    x = smooth_batch(4)
    params = only(blur_sigma=0.05, blur_probability=1.0)
    draws = sample_draws(4, params, tf.constant([0, 1]))
    out = apply_intensity(tf.cast(x, tf.float32), draws, params).numpy()
    sigma_px = draws.numpy()[:, N_AFFINE + 3] * 40
    for image, result, sigma in zip(x.numpy().astype(np.float64), out, sigma_px):
        radius = int(np.ceil(3 * 0.05 * 40))
        expected = gaussian_filter1d(image[..., 0], sigma, axis=0, mode="reflect",
                                     truncate=radius / sigma)
        expected = gaussian_filter1d(expected, sigma, axis=1, mode="reflect",
                                     truncate=radius / sigma)
        np.testing.assert_allclose(result[..., 0], np.clip(expected, 0, 255), atol=0.02)


def test_affine_draws_are_unchanged_by_the_intensity_columns():
    """A seeded run of the affine-only layer draws what it drew before intensity existed."""
    seed = tf.constant([11, 12])
    with_intensity = sample_draws(8, AugmentConfig(), seed).numpy()
    without = sample_draws(8, AugmentConfig().without_intensity(), seed).numpy()
    np.testing.assert_array_equal(with_intensity[:, :N_AFFINE], without[:, :N_AFFINE])
    assert with_intensity.shape == (8, 13)
    # the seed recipe's layer: columns 7+ are the identity draws
    seed_draws = sample_draws(8, AugmentConfig.seed_recipe(), seed).numpy()
    np.testing.assert_array_equal(seed_draws[:, N_AFFINE:N_AFFINE + 5],
                                  np.tile([1.0, 1.0, 0.0, 0.0, 0.0], (8, 1)))


@pytest.mark.slow
def test_fused_layer_with_intensity_compiles_with_xla_on_the_gather_backend():
    x = smooth_batch(8)
    layer = RandomAffine.from_params(AugmentConfig(blur_probability=1.0), backend="gather",
                                     seed=3)
    xla = tf.function(lambda images: layer(images, training=True), jit_compile=True)
    out = xla(x).numpy()
    assert out.shape == x.shape and np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 255 and not np.allclose(out, x.numpy())
    # The same draws through the kernel back end (no XLA) give the same images (noise off:
    # XLA's stateless normal draws other numbers than the CPU kernel from the same seed).
    params = dataclasses.replace(layer.params, noise_levels=0.0)
    draws = sample_draws(8, params, tf.constant([4, 4]))
    from pneumo_data.augment import augment_float
    gather = tf.function(lambda i: augment_float(i, draws, params, "gather"),
                         jit_compile=True)(tf.cast(x, tf.float32)).numpy()
    kernel = augment_float(tf.cast(x, tf.float32), draws, params, "kernel").numpy()
    np.testing.assert_allclose(gather, kernel, atol=0.05)


def test_ragged_batches_get_intensity_too():
    small = np.full((10, 12, 1), 100, np.uint8)
    tall = np.full((20, 8, 1), 100, np.uint8)
    ragged = tf.ragged.stack([tf.constant(small), tf.constant(tall)])
    out = RandomAffine.from_params(only(brightness_levels=50.0, noise_levels=4.0,
                                        blur_sigma=0.05, blur_probability=1.0),
                                   seed=3)(ragged, training=True)
    for image, source in zip(out, (small, tall)):
        image = image.to_tensor().numpy() if isinstance(image, tf.RaggedTensor) \
            else image.numpy()
        assert image.shape == source.shape and not np.array_equal(image, source)


def test_intensity_layer_saves_loads_and_continues_its_draws(tmp_path):
    import keras
    x = smooth_batch(4)
    model = keras.Sequential([keras.Input((40, 48, 1), dtype="uint8"),
                              RandomAffine.from_params(AugmentConfig(), seed=7)])
    model(x, training=True)
    model.save(tmp_path / "m.keras")
    clone = keras.models.load_model(tmp_path / "m.keras")
    assert clone.layers[0].params == AugmentConfig()
    np.testing.assert_array_equal(clone(x, training=True).numpy(),
                                  model(x, training=True).numpy())
    # A layer saved before the intensity transforms existed loads with them off.
    old = {k: v for k, v in RandomAffine(seed=1).get_config().items()
           if k not in INTENSITY_FIELDS}
    assert RandomAffine.from_config(old).params.intensity_is_identity


@pytest.mark.parametrize("kwargs", [dict(gamma=-0.1), dict(blur_probability=1.5),
                                    dict(noise_levels=300.0), dict(blur_sigma=0.5),
                                    dict(contrast=float("inf"))])
def test_invalid_intensity_ranges(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)


def test_box_muller_noise_is_standard_normal_and_seeded():
    from scipy.stats import kstest

    from pneumo_data.augment_intensity import _gaussian
    z = _gaussian(tf.constant([3, 101, 7, 1]), tf.constant([5, 6], tf.int64)).numpy()
    assert z.shape == (3, 101, 7, 1)  # an odd count: the last pair is cut
    assert kstest(z.ravel(), "norm").pvalue > 0.01
    again = _gaussian(tf.constant([3, 101, 7, 1]), tf.constant([5, 6], tf.int64)).numpy()
    np.testing.assert_array_equal(z, again)


# ---------------------------------------------------------------- the fused back end (issue 21)

def _idg_transform(params, size):
    """ImageDataGenerator's resampling for one of its random transforms on a square image,
    as the 8-number form of ImageProjectiveTransformV3 (output pixel -> input pixel).

    tf_keras ``apply_affine_transform`` builds rotation @ shift @ shear @ zoom about the
    centre, swaps it into (row, col) order and hands it to scipy's ``affine_transform``
    (order 1, mode 'nearest'); ``apply_transform`` then mirrors the output left-right when
    ``flip_horizontal`` is drawn. The same steps here, then (row, col) -> (x, y)."""
    theta, shear = np.deg2rad(params["theta"]), np.deg2rad(params["shear"])
    m = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                  [0, 0, 1]])
    m = m @ np.array([[1, 0, params["tx"]], [0, 1, params["ty"]], [0, 0, 1]])
    m = m @ np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
    m = m @ np.array([[params["zx"], 0, 0], [0, params["zy"], 0], [0, 0, 1]])
    o = size / 2 - 0.5
    m = np.array([[1, 0, o], [0, 1, o], [0, 0, 1]]) @ m @ np.array([[1, 0, -o], [0, 1, -o],
                                                                    [0, 0, 1]])
    m[:, [0, 1]] = m[:, [1, 0]]
    m[[0, 1]] = m[[1, 0]]
    (f00, f01, off0), (f10, f11, off1) = m[0], m[1]
    t = np.array([f11, f10, off1, f01, f00, off0, 0, 0])
    if params.get("flip_horizontal"):
        t = np.array([-f11, f10, f11 * (size - 1) + off1, -f01, f00, f01 * (size - 1) + off0,
                      0, 0])
    return t.astype(np.float32)


def test_fused_and_kernel_warps_reproduce_image_data_generator():
    """The seed recipe's transforms, drawn by ImageDataGenerator itself: both warps give its
    pixels (float differences of float32 arithmetic only, the same uint8 after rounding
    except at exact .5 ties)."""
    pytest.importorskip("tf_keras")
    from tf_keras.preprocessing.image import ImageDataGenerator

    from benchmarks.common import OLD_AUGMENTATION
    from pneumo_data.augment import warp_uint8
    size = 64
    gen = ImageDataGenerator(**OLD_AUGMENTATION)
    images = np.concatenate([smooth_batch(8, size, size, seed=3).numpy(),
                             batch(8, size, size, seed=4).numpy()])
    expected, transforms = [], []
    for k, image in enumerate(images):
        params = gen.get_random_transform(image.shape, seed=k)
        expected.append(gen.apply_transform(image.astype(np.float64), params))
        transforms.append(_idg_transform(params, size))
    expected, transforms = np.stack(expected), tf.constant(np.stack(transforms))
    x = tf.constant(images)
    kernel = warp(tf.cast(x, tf.float32), transforms, "kernel").numpy()
    fused = warp_uint8(x[..., 0], transforms).numpy()[..., None]
    for got in (kernel, fused):
        assert np.abs(got - expected).max() < 0.01
        assert (np.round(got) == np.round(expected)).mean() > 0.999


@pytest.mark.slow
def test_fused_matches_the_kernel_path_for_the_same_draws():
    from pneumo_data.augment import augment_float, fused_augment
    x = smooth_batch(16, 40, 40)
    for params in (AugmentConfig.seed_recipe(), AugmentConfig(blur_probability=1.0),
                   AugmentConfig()):
        draws = sample_draws(16, params, tf.constant([3, 9]))
        kernel = augment_float(x, draws, params, "kernel").numpy()
        fused = augment_float(x, draws, params, "fused").numpy()
        np.testing.assert_allclose(fused, kernel, atol=0.05)
        host = fused_augment(x, draws, params, to_uint8=True).numpy()
        assert host.dtype == np.uint8 and np.abs(host - np.round(kernel)).max() <= 1


@pytest.mark.slow
def test_fused_layer_takes_uint8_and_float32_and_falls_back_for_rgb():
    from pneumo_data.augment import augment_float, fusable, fused_augment
    layer = RandomAffine.from_params(AugmentConfig(), seed=5)
    x = smooth_batch(8, 32, 32)
    assert layer(x, training=True).dtype == tf.float32
    out = layer(tf.cast(x, tf.float32), training=True)  # float32: the fused passes too
    assert out.shape == x.shape and out.dtype == tf.float32
    assert fusable(tf.cast(x, tf.float32)) and not fusable(tf.cast(x, tf.float16))
    # float32 input gives the uint8 input's pixels (same draws), and the kernel path's
    params = AugmentConfig(blur_probability=1.0)
    draws = sample_draws(8, params, tf.constant([2, 3]))
    from_uint8 = fused_augment(x, draws, params).numpy()
    from_float = fused_augment(tf.cast(x, tf.float32), draws, params).numpy()
    np.testing.assert_allclose(from_float, from_uint8, atol=1e-3)
    kernel = augment_float(tf.cast(x, tf.float32), draws, params, "kernel").numpy()
    np.testing.assert_allclose(from_float, kernel, atol=0.05)
    rgb = tf.constant(np.repeat(x.numpy(), 3, axis=-1))  # kernel path
    assert not fusable(rgb) and layer(rgb, training=True).shape == rgb.shape
    fn = tf.function(lambda images: layer(images, training=True))  # batch unknown: compiles
    assert fn(x).shape == x.shape                                    # per concrete shape


def test_noise_field_is_iid_standard_normal_within_each_image():
    from scipy.stats import kstest

    from pneumo_data.augment import noise_field, noise_parts
    shape = tf.constant([16, 150, 150, 1])
    z = noise_field(shape, tf.constant([5, 6], tf.int64)).numpy()[..., 0]
    assert z.shape == (16, 150, 150)
    for image in z[:4]:
        assert kstest(image.ravel(), "norm").pvalue > 0.001
    # neighbouring pixels and rows are uncorrelated within an image
    assert abs(np.corrcoef(z[:, :, :-1].ravel(), z[:, :, 1:].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]) < 0.01
    # no bank row is used twice within an image (so its pixels are distinct draws)
    _, index, _ = noise_parts(shape, tf.constant([5, 6], tf.int64))
    assert all(len(set(row)) == 150 for row in index.numpy())
    np.testing.assert_array_equal(z, noise_field(shape, tf.constant([5, 6], tf.int64))
                                  .numpy()[..., 0])
    # noise per image at std s: the transform's std is the drawn one (as before)
    flat = tf.constant(np.full((200, 32, 32, 1), 128, np.uint8))
    params = only(noise_levels=6.0)
    draws = sample_draws(200, params, tf.constant([1, 1]))
    out = augment_batch(flat, params, tf.constant([1, 1])).numpy().astype(np.float64)
    stds = (out - 128).std(axis=(1, 2, 3))
    np.testing.assert_allclose(stds, draws.numpy()[:, N_AFFINE + 4], atol=0.35)


@pytest.mark.slow
def test_fused_host_augmentation_in_tf_data_is_seeded():
    x = smooth_batch(8, 32, 32)
    params = AugmentConfig()

    def stream():
        seeds = tf.data.Dataset.random(seed=4).batch(2)
        ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensors(x).repeat(3), seeds)
        return [b.numpy() for b in ds.map(lambda b, s: augment_batch(b, params, s),
                                          num_parallel_calls=2, deterministic=True)]
    a, b = stream(), stream()
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], a[1]) and a[0].dtype == np.uint8


def test_fused_blur_loop_blurs_only_the_drawn_images_and_keeps_their_means():
    """The fused back end blurs image by image in a loop over the images that drew a blur:
    the same pixels as the batched depthwise blur, the others untouched; and a blur with
    mirrored edges keeps an image's mean (so contrast may follow it, as the fused pass has
    it)."""
    from pneumo_data.augment_fused import _blur_loop
    from pneumo_data.augment_intensity import _blur, _blur_kernel
    x = tf.cast(smooth_batch(8, 40, 48, seed=5), tf.float32)[..., 0]
    sigma = tf.constant([0.05, 0.0, 0.02, 0.0, 0.0, 0.049, 0.001, 0.0])
    kernel = _blur_kernel(sigma, 40, 0.05)
    out = tf.function(_blur_loop, jit_compile=True)(x, sigma, kernel).numpy()
    expected = _blur(x[..., None], sigma, 0.05).numpy()[..., 0]
    np.testing.assert_allclose(out, expected, atol=2e-4)
    kept = sigma.numpy() == 0
    np.testing.assert_array_equal(out[kept], x.numpy()[kept])
    np.testing.assert_allclose(out.mean(axis=(1, 2)), x.numpy().mean(axis=(1, 2)), atol=1e-3)


def test_fused_warp_weights_follow_the_neighbour_it_gathered():
    """The fused warp computes the source index in one compiled loop and the weights in
    another; if the second rounded a point on a whole pixel the other way, a floor there
    would pair one pixel's weight with its neighbour. The weights are taken against the
    neighbour the index names: given the upper left neighbour one pixel up and left of a
    whole-pixel point (a weight of 1 on its lower right neighbour), the sample is still the
    point's own pixel; and any transform gives the kernel warp's pixels."""
    from pneumo_data.augment_fused import _ramps, _sample, warp_uint8
    x = batch(4, 40, 48, seed=7)
    shift = tf.constant([[1.0, 0.0, 3.0, 0.0, 1.0, 5.0, 0.0, 0.0]] * 4)  # whole pixels
    ys, xs = np.mgrid[0:40, 0:48]
    src_x, src_y = np.minimum(xs + 3, 47), np.minimum(ys + 5, 39)
    up_left = (np.arange(4)[:, None, None] * 40 + np.maximum(src_y - 1, 0)) * 48 \
        + np.maximum(src_x - 1, 0)
    sample = tf.function(_sample, jit_compile=True)
    out = sample(x[..., 0], tf.constant(up_left, tf.int32), shift, _ramps(40, 48)).numpy()
    np.testing.assert_array_equal(out, x.numpy()[:, src_y, src_x, 0].astype(np.float32))
    t = sample_transforms(16, 40, 48, AugmentConfig(rotation_deg=40, zoom=0.3),
                          tf.constant([8, 9]))
    x = batch(16, 40, 48, seed=8)
    kernel = warp(tf.cast(x, tf.float32), t, "kernel").numpy()[..., 0]
    np.testing.assert_allclose(warp_uint8(x[..., 0], t).numpy(), kernel, atol=0.02)
