"""Tests of pneumo_eval.shifts on small generated images (no real X-rays, no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_eval import shifts

RANDOM_SHIFTS = ("noise", "text", "marker", "square")


def xray_like(size: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth grey image with two dark 'lungs', a bright 'spine' and fine texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    image = 150 + 40 * y - 20 * x
    for cx in (0.3, 0.7):
        lung = ((x - cx) / 0.17) ** 2 + ((y - 0.5) / 0.32) ** 2 < 1
        image = np.where(lung, image - 70, image)
    image = np.where(np.abs(x - 0.5) < 0.05, image + 40, image)
    image = image + rng.normal(0, 6, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def image():
    return xray_like()


@pytest.mark.parametrize("name", sorted(shifts.SHIFTS))
def test_severity_zero_is_an_unchanged_copy(image, name):
    out = shifts.apply(name, 0, image, seed=3)
    np.testing.assert_array_equal(out, image)
    assert out is not image
    out[0, 0] ^= 1  # a copy: changing it leaves the input alone
    assert out[0, 0] != image[0, 0]


@pytest.mark.parametrize("name", sorted(shifts.SHIFTS))
def test_dtype_and_shape_kept_for_single_images_and_batches(image, name):
    batch = np.stack([image, xray_like(seed=1), xray_like(seed=2)])
    rect = xray_like(size=80)[:, :64]  # not square
    for severity in shifts.SEVERITIES:
        for array in (image, batch, rect):
            out = shifts.apply(name, severity, array, seed=0)
            assert out.dtype == np.uint8 and out.shape == array.shape


@pytest.mark.parametrize("name", sorted(shifts.SHIFTS))
def test_difference_grows_with_severity(image, name):
    diffs = [mean_abs_diff(shifts.apply(name, s, image, seed=0), image) for s in range(4)]
    assert diffs[0] == 0
    assert all(a < b for a, b in zip(diffs, diffs[1:])), (name, diffs)


@pytest.mark.parametrize("name", sorted(shifts.SHIFTS))
def test_deterministic_from_the_seed(image, name):
    batch = np.stack([image, xray_like(seed=5)])
    a = shifts.apply(name, 2, batch, seed=7)
    np.testing.assert_array_equal(a, shifts.apply(name, 2, batch, seed=7))
    others = [shifts.apply(name, 2, batch, seed=s) for s in range(8, 14)]
    if name in RANDOM_SHIFTS:
        assert any(not np.array_equal(a, b) for b in others)
    else:
        assert all(np.array_equal(a, b) for b in others)


@pytest.mark.parametrize("name", RANDOM_SHIFTS)
def test_image_randomness_depends_on_seed_and_index_only(image, name):
    batch = np.stack([image, xray_like(seed=1), xray_like(seed=2)])
    full = shifts.apply(name, 3, batch, seed=4)
    np.testing.assert_array_equal(shifts.apply(name, 3, batch[:2], seed=4), full[:2])
    np.testing.assert_array_equal(shifts.apply(name, 3, batch[0], seed=4), full[0])


def test_intensity_shifts_move_the_statistics_the_documented_way(image):
    f = image.astype(np.float64)
    low = shifts.apply("contrast_low", 2, image).astype(np.float64)
    assert low.std() == pytest.approx(0.55 * f.std(), rel=0.02)
    assert low.mean() == pytest.approx(f.mean(), abs=0.5)
    assert shifts.apply("contrast_high", 1, image).std() > f.std()
    assert shifts.apply("gamma_dark", 1, image).mean() < f.mean()
    assert shifts.apply("gamma_light", 1, image).mean() > f.mean()
    up = shifts.apply("brightness_up", 1, image).astype(np.float64)
    unclipped = image <= 255 - 20
    np.testing.assert_array_equal(up[unclipped], f[unclipped] + 20)
    down = shifts.apply("brightness_down", 3, image).astype(np.float64)
    np.testing.assert_array_equal(down, np.maximum(f - 60, 0))


def test_gamma_is_exact_on_known_levels():
    levels = np.tile(np.array([0, 64, 128, 255], np.uint8), (16, 4))
    out = shifts.apply("gamma_dark", 3, levels)
    expected = np.round(255 * (np.array([0, 64, 128, 255]) / 255) ** 2.5).astype(np.uint8)
    np.testing.assert_array_equal(out[0, :4], expected)


def test_blur_noise_and_resolution(image):
    def high_freq(a):
        return float(np.abs(np.diff(a.astype(np.float64), axis=1)).mean())
    assert high_freq(shifts.apply("blur", 1, image)) < high_freq(image)
    flat = np.full((64, 64), 100, np.uint8)
    np.testing.assert_array_equal(shifts.apply("blur", 3, flat), flat)
    np.testing.assert_array_equal(shifts.apply("downsample", 3, flat), flat)
    noisy = shifts.apply("noise", 3, flat, seed=1).astype(np.float64) - 100
    assert noisy.std() == pytest.approx(16, rel=0.05) and abs(noisy.mean()) < 1
    assert high_freq(shifts.apply("downsample", 3, image)) < high_freq(image)


def test_jpeg_loses_more_at_lower_quality(image):
    errors = [mean_abs_diff(shifts.apply("jpeg", s, image), image) for s in (1, 2, 3)]
    assert 0 < errors[0] < errors[1] < errors[2]


def test_crop_removes_a_border_and_pad_adds_one():
    framed = np.full((100, 100), 150, np.uint8)
    framed[:5], framed[-5:], framed[:, :5], framed[:, -5:] = 0, 0, 0, 0
    cropped = shifts.apply("crop", 1, framed)  # 5% of 100 px: exactly the black frame
    assert cropped.min() == 150
    padded = shifts.apply("pad", 2, np.full((100, 100), 150, np.uint8))  # 10 px of black
    assert (padded[:10] == 0).all() and (padded[:, -10:] == 0).all()
    assert (padded[10:90, 10:90] == 150).all()


@pytest.mark.parametrize("name", ("text", "marker", "square"))
def test_burned_in_marks_are_white_and_sit_in_one_corner(name):
    grey = np.full((120, 120), 90, np.uint8)
    for seed in range(6):
        out = shifts.apply(name, 3, grey, seed=seed)
        changed = out != grey
        assert changed.any() and (out[changed] > 90).all()
        assert out.max() >= 240  # white (antialiased letter edges are lighter grey)
        rows, cols = np.nonzero(changed)
        # every changed pixel lies in the same quarter of the image
        assert len({(r >= 60, c >= 60) for r, c in zip(rows, cols)}) == 1


def test_square_side_follows_its_parameter():
    grey = np.zeros((200, 200), np.uint8)
    for severity in shifts.SEVERITIES:
        out = shifts.apply("square", severity, grey, seed=0)
        side = round(shifts.parameter("square", severity) * 200)
        assert (out == 255).sum() == side * side


def test_descriptions_name_units_and_parameters():
    assert shifts.describe("jpeg", 3) == (
        "jpeg: JPEG re-compression, JPEG quality (Pillow scale 1-95) = 10")
    assert "severity 0" in shifts.describe("blur", 0)
    assert set(shifts.SHIFTS) == set(shifts.PARAMS)
    for values, unit, _ in shifts.PARAMS.values():
        assert len(values) == 3 and unit


@pytest.mark.parametrize("call, message", [
    (lambda im: shifts.apply("fog", 1, im), "unknown shift"),
    (lambda im: shifts.apply("blur", 4, im), "severity"),
    (lambda im: shifts.apply("blur", -1, im), "severity"),
    (lambda im: shifts.apply("blur", 1.0, im), "severity"),
    (lambda im: shifts.apply("blur", True, im), "severity"),
    (lambda im: shifts.apply("blur", 1, im.astype(np.float32)), "uint8"),
    (lambda im: shifts.apply("blur", 1, im[None, None]), "shape"),
    (lambda im: shifts.apply("blur", 1, im[:8, :8]), "16x16"),
    (lambda im: shifts.apply("noise", 1, im, seed=-1), "seed"),
    (lambda im: shifts.parameter("noise", 0), "severity"),
])
def test_bad_input_is_refused_with_a_clear_error(image, call, message):
    with pytest.raises(shifts.ShiftError, match=message):
        call(image)
    from pneumo_data.common.errors import UserError
    assert issubclass(shifts.ShiftError, UserError)
