import io

import numpy as np
import pytest
from PIL import Image

from pneumo_data.preprocess import DEFAULT_MAX_PIXELS, DecodeError, PreprocessSpec, decode


def decode_to_gray(data: bytes, size: int, resize: str = "stretch",
                   max_pixels: int = DEFAULT_MAX_PIXELS, fast_jpeg: bool = True) -> np.ndarray:
    return decode(data, PreprocessSpec(size, resize, fast_jpeg, max_pixels)).pixels


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def gray(value=100, size=(40, 30)):
    return Image.fromarray(np.full(size[::-1], value, np.uint8), "L")


@pytest.mark.parametrize("mode,exact", [("L", True), ("RGB", True), ("RGBA", True),
                                        ("LA", True), ("P", False), ("1", False)])
def test_modes_become_gray_uint8_with_the_right_values(mode, exact):
    out = decode_to_gray(encoded(gray(200).convert(mode), "PNG"), 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    if exact:  # lossless gray in any container decodes to the same grey level
        assert (out == 200).all(), np.unique(out)
    else:  # palette quantisation / 1-bit dithering keep the mean grey level
        assert abs(float(out.mean()) - 200) < 12, out.mean()


def test_colour_converts_with_luma_weights():
    rgb = Image.fromarray(np.dstack([np.full((8, 8), v, np.uint8) for v in (255, 0, 0)]), "RGB")
    assert (decode_to_gray(encoded(rgb, "PNG"), 8) == 76).all()  # 0.299 * 255


def test_cmyk_jpeg():
    out = decode_to_gray(encoded(gray(90).convert("CMYK"), "JPEG", quality=95), 8)
    assert abs(int(out.mean()) - 90) <= 3


def test_16_bit_png_maps_full_range():
    pixels = np.full((10, 10), 65535, np.uint16)
    pixels[:5] = 256 * 40
    image = Image.fromarray(pixels)  # I;16
    out = decode_to_gray(encoded(image, "PNG"), 10, fast_jpeg=False)
    assert out[0, 0] == 40 and out[-1, -1] == 255


def test_exif_orientation_is_applied():
    landscape = gray(255, size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    data = encoded(landscape, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_to_gray(data, 40, resize="pad")
    # Displayed upright it is portrait: black padding left and right, not top/bottom.
    assert out[:, :5].max() < 10 and out[:, -5:].max() < 10
    assert out[:5, 20].min() > 200 and out[-5:, 20].min() > 200


def test_stretch_and_pad():
    image = gray(255, size=(40, 20))
    assert decode_to_gray(encoded(image, "PNG"), 20).min() > 250
    padded = decode_to_gray(encoded(image, "PNG"), 20, resize="pad")
    assert padded[0].max() == 0 and padded[10].min() > 250


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"hello, I am a text file\n" * 10, "not an image"),
])
def test_unreadable_inputs(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_to_gray(data, 8)


def test_truncated_jpeg():
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200),
                                                                     np.uint8)), "JPEG")
    with pytest.raises(DecodeError, match="truncated"):
        decode_to_gray(data[: len(data) // 3], 8)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encoded(Image.new("1", (12000, 12000)), "PNG")  # ~20 KB, 144 Mpixels
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError, match="too large"):
        decode_to_gray(bomb, 8)
    with pytest.raises(DecodeError, match="too large"):
        decode_to_gray(encoded(gray(), "PNG"), 8, max_pixels=100)


def test_fast_jpeg_stays_close_to_full_decode():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (30, 40)), np.ones((40, 40))).astype(np.uint8)
    data = encoded(Image.fromarray(smooth), "JPEG", quality=95)
    fast = decode_to_gray(data, 128, fast_jpeg=True).astype(int)
    full = decode_to_gray(data, 128, fast_jpeg=False).astype(int)
    assert np.abs(fast - full).mean() < 2.0
