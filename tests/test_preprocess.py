"""Stage (a) and (b) of pneumo_data.preprocess: the Pillow and TF paths give the same pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from pneumo_data.common.errors import UserError
from pneumo_data.preprocess import decode
from pneumo_data.preprocess.exif import ORIENTATION_TAG, exif_orientation, orient
from pneumo_data.preprocess.exif_tf import exif_orientation_tf
from pneumo_data.preprocess.model_input import to_model_input_np
from pneumo_data.preprocess.model_input_tf import to_model_input
from pneumo_data.preprocess.spec import VERSION, DecodeError, PreprocessSpec, draft_scale
from pneumo_data.preprocess.stored import decode_stored, luma, pil_bilinear_resize
from pneumo_data.preprocess.stored_tf import decode_stored_tf, luma_tf, pil_bilinear_resize_tf


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def xray_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient with noise and an asymmetric bright blob (orientation shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = 60 + 120 * x / max(width - 1, 1) + 40 * np.sin(y / max(height, 1) * 6)
    blob = 80 * np.exp(-(((x - 0.3 * width) / (0.1 * width + 1)) ** 2
                         + ((y - 0.2 * height) / (0.1 * height + 1)) ** 2))
    return np.clip(base + blob + rng.normal(0, 12, (height, width)), 0, 255).astype(np.uint8)


_DECODE_TF = {}
# Few distinct specs: each one traces the TF decoder anew (a few seconds).
S64 = PreprocessSpec(stored_size=64)
S64_PAD = PreprocessSpec(stored_size=64, resize="pad")
S96_FULL = PreprocessSpec(stored_size=96, fast_jpeg=False)


def decode_tf(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    fn = _DECODE_TF.get(spec)
    if fn is None:
        fn = tf.function(lambda d: decode_stored_tf(d, spec),
                         input_signature=[tf.TensorSpec([], tf.string)])
        _DECODE_TF[spec] = fn
    return fn(tf.constant(data)).numpy()[..., 0]


def assert_parity(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    want = decode_stored(data, spec)
    got = decode_tf(data, spec)
    assert want.shape == got.shape == (spec.stored_size, spec.stored_size)
    assert want.dtype == got.dtype == np.uint8
    diff = np.abs(want.astype(int) - got.astype(int))
    assert diff.max() == 0, f"{(diff > 0).mean():.4%} of pixels differ, max {diff.max()}"
    return want


# ------------------------------------------------------------------ the resize itself

@pytest.mark.parametrize("seed", range(4))
def test_tf_resize_is_pillow_bilinear_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(1, 600, 2))
        oh, ow = (int(v) for v in rng.integers(1, 400, 2))
        image = rng.integers(0, 256, (h, w)).astype(np.uint8)
        want = pil_bilinear_resize(image, oh, ow)
        got = pil_bilinear_resize_tf(image, oh, ow).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"{h}x{w} -> {oh}x{ow}")


def test_one_axis_resizes_are_pillows_own():
    image = np.random.default_rng(0).integers(0, 256, (50, 70)).astype(np.uint8)
    for oh, ow in [(50, 13), (50, 300), (9, 70), (200, 70)]:
        want = np.asarray(Image.fromarray(image).resize((ow, oh), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(pil_bilinear_resize(image, oh, ow), want)


def test_pillow_13_vertical_first_order_is_not_what_we_store():
    """Pillow 13 goes vertical-first when the height shrinks much more (#9549); we don't."""
    image = np.random.default_rng(1).integers(0, 256, (230, 60)).astype(np.uint8)
    ours = pil_bilinear_resize(image, 58, 312)
    horizontal_first = np.asarray(
        Image.fromarray(image).resize((312, 230), Image.Resampling.BILINEAR)
        .resize((312, 58), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ours, horizontal_first)


def test_luma_is_pillows_convert_l():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    want = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
    np.testing.assert_array_equal(luma(rgb), want)
    np.testing.assert_array_equal(luma_tf(rgb).numpy(), want)


# ------------------------------------------------------------------ stage (a) parity

@pytest.mark.slow
@pytest.mark.parametrize("size", [(224, 224), (300, 200), (97, 131), (1200, 900), (2600, 2100)])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_parity_at_several_sizes_and_draft_scales(size, mode):
    pixels = xray_like(*size)
    image = Image.fromarray(pixels, "L")
    if mode == "RGB":
        image = Image.merge("RGB", (image, image.point(lambda v: v * 0.9),
                                    image.point(lambda v: 255 - v)))
    data = encode(image, "JPEG", quality=90)
    for spec in (PreprocessSpec(), S64, S96_FULL):
        assert_parity(data, spec)


def test_draft_scales_1_2_4_8_are_all_exercised():
    sides = (130, 260, 520, 1100)
    assert [draft_scale(w, w, 64) for w in sides] == [1, 2, 4, 8]
    for side in sides:
        data = encode(Image.fromarray(xray_like(side, side), "L"), "JPEG", quality=92)
        assert_parity(data, S64)


def test_progressive_and_subsampled_jpegs():
    image = Image.fromarray(xray_like(640, 480), "L").convert("RGB")
    assert_parity(encode(image, "JPEG", progressive=True, quality=85), PreprocessSpec())
    assert_parity(encode(image, "JPEG", subsampling=2, quality=75), PreprocessSpec())


def test_cmyk_jpeg_parity():
    image = Image.fromarray(xray_like(300, 240), "L").convert("CMYK")
    data = encode(image, "JPEG", quality=95)
    out = assert_parity(data, S64)
    reference = decode_stored(encode(image.convert("RGB"), "PNG"), S64)
    assert np.abs(out.astype(int) - reference).mean() < 3


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1", "I;16", "RGB;16"])
def test_png_parity_for_every_mode(mode):
    pixels = xray_like(180, 140, seed=2)
    if mode == "I;16":
        wide = pixels.astype(np.uint16) * 257 + np.random.default_rng(0).integers(
            0, 257, pixels.shape).astype(np.uint16)
        data = encode(Image.fromarray(wide), "PNG")
        assert Image.open(io.BytesIO(data)).mode == "I;16"
    elif mode == "RGB;16":
        data = _rgb16_png(pixels)
    else:
        image = Image.fromarray(pixels, "L").convert("RGB")
        image = image.convert(mode) if mode not in ("P",) else image.quantize(64)
        data = encode(image, "PNG")
    assert_parity(data, S64)
    assert_parity(data, S64_PAD)


def _rgb16_png(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written with TF (Pillow cannot write one)."""
    wide = np.stack([pixels, 255 - pixels, pixels // 2], -1).astype(np.uint16) * 257
    return tf.io.encode_png(tf.constant(wide)).numpy()


def test_16_bit_png_keeps_the_high_byte():
    wide = np.full((64, 64), 65535, np.uint16)
    wide[:32] = 256 * 40 + 255
    data = encode(Image.fromarray(wide), "PNG")
    out = assert_parity(data, S64)
    assert out[0, 0] == 40 and out[-1, -1] == 255


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_parity_and_pillow_semantics(orientation, fmt):
    pixels = xray_like(120, 80, seed=orientation)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    exif[0x010F] = "pneumo test"  # another tag before it in the IFD
    data = encode(Image.fromarray(pixels, "L"), fmt, exif=exif.tobytes(),
                  **({"quality": 95} if fmt == "JPEG" else {}))
    assert exif_orientation(data) == orientation
    assert int(exif_orientation_tf(tf.constant(data))) == orientation
    # Pillow's own transpose of the decoded file is what the spec means.
    opened = Image.open(io.BytesIO(data))
    assert opened.getexif().get(ORIENTATION_TAG) == orientation
    want = np.asarray(ImageOps.exif_transpose(opened).convert("L"))
    np.testing.assert_array_equal(orient(np.asarray(opened.convert("L")), orientation), want)
    out = assert_parity(data, S64_PAD)
    # Orientations 5-8 turn the landscape image portrait: padding moves to the sides.
    if orientation >= 5:
        assert out[:, :8].max() == 0 and out[:8, 32].min() > 0
    else:
        assert out[:8, :].max() == 0 and out[32, :8].min() > 0


def test_exif_in_a_second_app_segment_and_jfif_first():
    pixels = xray_like(90, 60)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    data = encode(Image.fromarray(pixels, "L"), "JPEG", exif=exif.tobytes(), quality=95)
    # Put a COM segment between SOI and the EXIF APP1.
    comment = b"\xff\xfe" + (2 + 11).to_bytes(2, "big") + b"hello world"
    data = data[:2] + comment + data[2:]
    assert exif_orientation(data) == 6
    assert int(exif_orientation_tf(tf.constant(data))) == 6
    assert_parity(data, S64)


def test_files_without_exif_or_with_broken_exif_are_upright():
    plain = encode(Image.fromarray(xray_like(50, 40), "L"), "PNG")
    assert exif_orientation(plain) == 1
    assert int(exif_orientation_tf(tf.constant(plain))) == 1
    broken = b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00XX\x00\x00"
    assert exif_orientation(broken) == 1
    assert int(exif_orientation_tf(tf.constant(broken))) == 1


@pytest.mark.parametrize("size", [(300, 120), (120, 300), (256, 256), (3, 500)])
def test_pad_mode_parity(size):
    data = encode(Image.fromarray(xray_like(*size), "L"), "PNG")
    out = assert_parity(data, S64_PAD)
    assert out.shape == (64, 64)


def test_tf_path_refuses_what_it_cannot_decode():
    spec = S64
    dicom = b"\x00" * 128 + b"DICM" + b"\x00" * 64
    with pytest.raises(tf.errors.InvalidArgumentError, match="DICOM"):
        decode_tf(dicom, spec)
    bmp = encode(Image.fromarray(xray_like(20, 20), "L"), "BMP")
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG or PNG"):
        decode_tf(bmp, spec)
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty"):
        decode_tf(b"", spec)
    big = encode(Image.fromarray(xray_like(200, 200), "L"), "PNG")
    small_limit = PreprocessSpec(stored_size=64, max_pixels=1000)
    with pytest.raises(tf.errors.InvalidArgumentError, match="too large"):
        decode_tf(big, small_limit)
    with pytest.raises(DecodeError, match="too large"):
        decode_stored(big, small_limit)
    jpeg = encode(Image.fromarray(xray_like(200, 200), "L"), "JPEG")
    with pytest.raises(tf.errors.InvalidArgumentError, match="too large"):
        decode_tf(jpeg, small_limit)
    # Pillow reads BMP; only the TF path refuses it.
    assert decode_stored(bmp, spec).shape == (64, 64)


def test_spec_round_trip_and_validation():
    spec = PreprocessSpec(128, "pad", False, 1000)
    assert spec.to_dict()["version"] == VERSION
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(UserError, match="resize"):
        PreprocessSpec(resize="crop")
    with pytest.raises(UserError, match="stored image size"):
        PreprocessSpec(stored_size=4)
    with pytest.raises(UserError, match="version 2"):
        PreprocessSpec.from_dict({**spec.to_dict(), "version": 2})
    with pytest.raises(UserError, match="unknown"):
        PreprocessSpec.from_dict({**spec.to_dict(), "gamma": 1.0})


def test_the_decode_entry_point_is_stage_a(tmp_path):
    """preprocess.decode (bytes or a path) is the Pillow stage (a) for images, errors included."""
    data = encode(Image.fromarray(xray_like(300, 200), "L"), "JPEG", quality=90)
    spec = PreprocessSpec(64, "pad", False)
    (tmp_path / "x.jpeg").write_bytes(data)
    for source in (data, tmp_path / "x.jpeg", str(tmp_path / "x.jpeg")):
        decoded = decode(source, spec)
        np.testing.assert_array_equal(decoded.pixels, decode_stored(data, spec))
        assert decoded.dicom is None
    assert issubclass(DecodeError, UserError)
    with pytest.raises(DecodeError, match="empty"):
        decode(b"", spec)


# ------------------------------------------------------------------ stage (b)

@pytest.mark.parametrize("stored,model", [(256, 150), (256, 224), (256, 128), (256, 256),
                                          (224, 150), (150, 224), (64, 100), (300, 299)])
def test_stage_b_tf_equals_numpy_and_stays_near_tf_resize(stored, model):
    images = np.random.default_rng(stored + model).integers(0, 256, (3, stored, stored, 1))
    images = images.astype(np.uint8)
    got = to_model_input(images, model).numpy()
    np.testing.assert_array_equal(got, to_model_input_np(images, model))
    assert got.shape == (3, model, model, 1) and got.dtype == np.uint8
    # The pipeline's old float resize + round: the same up to float ties.
    method = "area" if model < stored else "bilinear"
    old = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(images, [model, model],
                                                             method=method)), 0, 255),
                  tf.uint8).numpy()
    diff = np.abs(old.astype(int) - got)
    # TF's float32 area weights are off by up to ~0.02 grey levels, so a few
    # percent of the pixels round the other way (2.3% at 256 -> 224).
    assert diff.max() <= 1 and (diff > 0).mean() < 0.05


@pytest.mark.parametrize("stored,model", [(10, 7), (9, 4), (7, 10), (5, 12)])
def test_stage_b_is_the_exact_rational_average(stored, model):
    """Against a slow reference in exact fractions (box average / half-pixel bilinear)."""
    from fractions import Fraction

    def axis(i):
        row = [Fraction(0)] * stored
        if model < stored:
            lo, hi = Fraction(i * stored, model), Fraction((i + 1) * stored, model)
            for j in range(stored):
                row[j] = max(Fraction(0), min(hi, j + 1) - max(lo, Fraction(j))) / (hi - lo)
        else:
            src = Fraction(2 * i + 1, 2) * Fraction(stored, model) - Fraction(1, 2)
            low = src.numerator // src.denominator
            frac = src - low
            row[min(max(low, 0), stored - 1)] += 1 - frac
            row[min(max(low + 1, 0), stored - 1)] += frac
        return row

    image = np.random.default_rng(stored * model).integers(0, 256, (stored, stored))
    weights = [axis(i) for i in range(model)]
    want = np.zeros((model, model), np.int64)
    for i in range(model):
        for j in range(model):
            value = sum(weights[i][a] * weights[j][b] * int(image[a, b])
                        for a in range(stored) for b in range(stored))
            want[i, j] = round(value)  # Fraction rounds half to even
    got = to_model_input(image.astype(np.uint8)[None, ..., None], model).numpy()[0, ..., 0]
    np.testing.assert_array_equal(got, want)


def test_stage_b_rounds_ties_to_even():
    image = np.zeros((1, 4, 4, 1), np.uint8)
    image[0, :2, :2, 0] = [[1, 2], [2, 2]]  # mean 1.75 -> 2
    image[0, :2, 2:, 0] = [[1, 1], [1, 2]]  # 1.25 -> 1
    image[0, 2:, :2, 0] = [[1, 2], [1, 2]]  # 1.5 -> 2 (even)
    image[0, 2:, 2:, 0] = [[2, 3], [2, 3]]  # 2.5 -> 2 (even)
    out = to_model_input(image, 2).numpy()[0, ..., 0]
    np.testing.assert_array_equal(out, [[2, 1], [2, 2]])


def test_stage_b_works_per_image_and_in_tf_data():
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 1)).astype(np.uint8)
    batch = to_model_input(images, 40).numpy()
    ds = tf.data.Dataset.from_tensor_slices(images).map(lambda x: to_model_input(x, 40))
    np.testing.assert_array_equal(np.stack(list(ds.as_numpy_iterator())), batch)


def test_stage_b_refuses_dynamic_or_non_square_input():
    with pytest.raises(ValueError, match="square"):
        to_model_input(np.zeros((2, 10, 12, 1), np.uint8), 5)


# ------------------------------------------------------------------ real X-rays

def _real_files(shared_data: Path) -> list[Path]:
    full = sorted((shared_data / "chest_xray_fullres").rglob("*.jp*g"))
    small = sorted((shared_data / "chest_xray_224").rglob("*.jp*g"))[::50]
    if not full and not small:
        pytest.skip("no real JPEGs under the shared data folder")
    return full + small


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_xrays_pixels_and_probabilities_match(shared_data):
    """Every full-size original and a sample of the 224 px copies, bit for bit."""
    from pneumo_models.models import build_model

    files = _real_files(shared_data)
    spec = PreprocessSpec()
    data = [path.read_bytes() for path in files]
    pillow = np.stack([decode_stored(d, spec) for d in data])[..., None]
    graph = np.stack(list(tf.data.Dataset.from_tensor_slices(data).map(
        lambda d: decode_stored_tf(d, spec), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True).as_numpy_iterator()))
    differing = (pillow != graph).any(axis=(1, 2, 3))
    assert not differing.any(), [str(files[i]) for i in np.flatnonzero(differing)[:5]]
    model = build_model("manual_cnn", image_size=150, weights="none", seed=0)
    p1 = model.predict(to_model_input(pillow, 150), verbose=0, batch_size=64)
    p2 = model.predict(to_model_input(graph, 150), verbose=0, batch_size=64)
    assert np.abs(p1 - p2).max() <= 1e-3


@pytest.mark.shared_data
def test_real_xray_rotated_and_16_bit_versions(shared_data):
    files = _real_files(shared_data)[:6]
    spec = PreprocessSpec()
    for k, path in enumerate(files):
        gray = decode_stored(path.read_bytes(), PreprocessSpec(stored_size=512))
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = 2 + k % 7
        rotated = encode(Image.fromarray(gray, "L"), "JPEG", exif=exif.tobytes(), quality=93)
        assert_parity(rotated, spec)
        wide = encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")
        assert_parity(wide, spec)
