"""DICOM decoding: grey levels against pydicom's own modality/VOI functions, and every refusal."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom import uid  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from pneumo_data.preprocess import (  # noqa: E402
    DEFAULT_MAX_PIXELS,
    RESIZE_MODES,
    DecodeError,
    PreprocessSpec,
    decode,
)
from pneumo_data.preprocess import dicom as dicom_module  # noqa: E402
from pneumo_data.preprocess.dicom import (  # noqa: E402
    DicomDecodeError,
    dicom_to_uint8,
    is_dicom,
    read_dicom_info,
)
from pneumo_data.preprocess.stored import resize_stored  # noqa: E402
from tests.dicom_files import (  # noqa: E402
    gradient,
    jpeg_baseline_dataset,
    make_dataset,
    structured_report,
    to_bytes,
    write,
)


def reread(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The documented 8-bit rule: [low, high] linearly onto 0..255, rounded."""
    return np.clip(np.rint((values - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def window_range(ds: Dataset) -> tuple[float, float]:
    """The output range pydicom's windowing maps onto (its y_min, y_max), asked from pydicom."""
    ends = apply_windowing(np.array([-1e12, 1e12]), ds)
    return float(ends[0]), float(ends[1])


def assert_close(ours: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32-vs-float64 rounding at .5 boundaries."""
    assert ours.shape == expected.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.max() <= 1, diff.max()
    assert (diff == 0).mean() > 0.99


def decode_dicom(data: bytes, size: int, resize: str = "stretch",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
    return dicom_module.decode_dicom(data, PreprocessSpec(size, resize, max_pixels=max_pixels))


def decoded_full(ds: Dataset) -> tuple[np.ndarray, object]:
    """decode_dicom at the native size (stretch to the same square: rows == columns)."""
    return decode_dicom(to_bytes(ds), ds.Rows)


# ---------------------------------------------------------------- grey levels

def test_8_bit_is_used_as_is_and_tags_are_recorded():
    pixels = gradient((32, 32), 0, 255, np.uint8)
    out, info = decoded_full(make_dataset(pixels, PatientID="P-42", ViewPosition="AP"))
    np.testing.assert_array_equal(out, pixels)
    assert info.voi == "8bit"
    assert (info.patient_id, info.view_position, info.modality, info.body_part) == (
        "P-42", "AP", "DX", "CHEST")
    assert (info.photometric, info.rows, info.columns, info.bits_allocated, info.bits_stored,
            info.signed, info.frames, info.has_pixels) == (
        "MONOCHROME2", 32, 32, 8, 8, False, 1, True)
    assert info.transfer_syntax == "Explicit VR Little Endian" and info.decoder == "native"


def test_12_bit_in_16_masks_high_bits_then_stretches_min_max():
    stored = gradient((40, 40), 100, 3900)
    ds = make_dataset(stored, bits_stored=12)
    # Garbage above bit 11 (overlay bits in old files) must not reach the image.
    ds.PixelData = (stored | np.uint16(0xF000)).tobytes()
    ds = reread(ds)
    values = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(values, stored)  # pydicom masked them
    gray, info = dicom_to_uint8(ds)
    assert info.voi == "minmax"
    assert_close(gray, stretch(values, values.min(), values.max()))
    assert gray.min() == 0 and gray.max() == 255


def test_16_bit_unsigned_with_rescale_and_no_window_uses_min_max_of_rescaled():
    ds = reread(make_dataset(gradient((36, 36), 0, 60000), bits_stored=16,
                             RescaleSlope="0.5", RescaleIntercept="-100"))
    values = apply_modality_lut(ds.pixel_array, ds)
    gray, info = dicom_to_uint8(ds)
    assert info.voi == "minmax"
    assert_close(gray, stretch(values, values.min(), values.max()))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID", None])
def test_16_bit_signed_with_rescale_and_window_matches_pydicom(function):
    stored = gradient((40, 40), -2000, 3000, np.int16)
    tags = dict(RescaleSlope="1.5", RescaleIntercept="-1024", WindowCenter="400",
                WindowWidth="1500")
    if function:
        tags["VOILUTFunction"] = function
    ds = reread(make_dataset(stored, bits_stored=16, **tags))
    assert ds.PixelRepresentation == 1
    values = apply_modality_lut(ds.pixel_array, ds)
    with np.errstate(over="ignore"):  # pydicom's sigmoid overflows exp far from the centre
        windowed = apply_windowing(values, ds)
        low, high = window_range(ds)
    gray, info = dicom_to_uint8(ds)
    assert info.voi == ("window-sigmoid" if function == "SIGMOID" else "window")
    assert_close(gray, stretch(windowed, low, high))
    assert 0 < (gray == 0).mean() < 1 and 0 < (gray == 255).mean() < 1  # the window clips


def test_modality_lut_sequence_then_window_matches_pydicom():
    item = Dataset()
    # 16 bits per entry: pydicom 3.0's reference (apply_modality_lut) cannot read 12.
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "US", [4095 - i for i in range(4096)])  # a reversing table
    item.ModalityLUTType = "US"
    ds = make_dataset(gradient((32, 32), 0, 4095), bits_stored=12, WindowCenter="1500",
                      WindowWidth="2000")
    ds.ModalityLUTSequence = Sequence([item])
    ds = reread(ds)
    values = apply_modality_lut(ds.pixel_array, ds)
    low, high = window_range(ds)
    gray, info = dicom_to_uint8(ds)
    assert info.voi == "window"
    assert_close(gray, stretch(apply_windowing(values, ds), low, high))
    assert gray[0, 0] > gray[-1, -1]  # the table reversed the ramp


def test_multi_valued_window_uses_the_first_value():
    ds = reread(make_dataset(gradient((32, 32), 0, 4095), bits_stored=12,
                             WindowCenter=["1000", "3000"], WindowWidth=["800", "2000"]))
    low, high = window_range(ds)
    expected = stretch(apply_windowing(ds.pixel_array, ds, index=0), low, high)
    gray, _ = dicom_to_uint8(ds)
    assert_close(gray, expected)
    second = stretch(apply_windowing(ds.pixel_array, ds, index=1), low, high)
    assert np.abs(gray.astype(int) - second).mean() > 20


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_sequence_wins_over_window_and_matches_pydicom(vr):
    stored = gradient((40, 40), 0, 4095)
    lut_item = Dataset()
    # A gamma curve declared as 16-bit but filling 0..4095 only, as real exports often do.
    table = [int(round(4095 * (i / 4095) ** 0.5)) for i in range(4096)]
    lut_item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    lut_item.add_new("LUTData", vr, table if vr == "US" else np.asarray(table, "<u2").tobytes())
    ds = make_dataset(stored, bits_stored=12, WindowCenter="2048", WindowWidth="4096")
    ds.VOILUTSequence = Sequence([lut_item])
    ds = reread(ds)
    looked_up = apply_voi(ds.pixel_array, ds)
    gray, info = dicom_to_uint8(ds)
    assert info.voi == "lut"
    assert_close(gray, stretch(looked_up, min(table), max(table)))
    # The square-root curve brightens the mid-tones relative to a linear map of the same data.
    assert gray.mean() > stretch(ds.pixel_array, 0, 4095).mean() + 20


def test_monochrome1_is_inverted_so_bone_stays_bright():
    stored = gradient((32, 32), 0, 4095)
    tags = dict(WindowCenter="2000", WindowWidth="3000")
    mono2, _ = decoded_full(make_dataset(stored, bits_stored=12, **tags))
    mono1, info = decoded_full(make_dataset(stored, "MONOCHROME1", bits_stored=12, **tags))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert info.photometric == "MONOCHROME1"
    eight, _ = decoded_full(make_dataset(gradient((32, 32), 0, 255, np.uint8), "MONOCHROME1"))
    np.testing.assert_array_equal(eight, 255 - gradient((32, 32), 0, 255, np.uint8))


@pytest.mark.parametrize("signed,tags", [
    (True, dict(RescaleSlope="1.5", RescaleIntercept="-1024", WindowCenter="400",
                WindowWidth="1500")),
    (True, dict(RescaleSlope="-2", RescaleIntercept="10")),  # decreasing: min/max swap ends
    (False, dict(WindowCenter="700", WindowWidth="900", VOILUTFunction="SIGMOID")),
    (False, {}),
])
def test_table_lookup_equals_per_pixel_arithmetic(signed, tags):
    from pneumo_data.preprocess.dicom import _grey_levels, _monochrome_to_uint8
    stored = gradient((40, 40), -2000 if signed else 0, 3000, np.int16 if signed else np.uint16)
    ds = reread(make_dataset(stored, bits_stored=16, **tags))
    fast, rule = _monochrome_to_uint8(ds.pixel_array, ds)
    slow, slow_rule = _grey_levels(ds.pixel_array, ds, False, None)
    np.testing.assert_array_equal(fast, slow)
    assert rule == slow_rule


def test_unusable_window_falls_back_to_min_max_and_says_so():
    ds = reread(make_dataset(gradient((32, 32), 0, 4095), bits_stored=12,
                             WindowCenter="100", WindowWidth="0"))
    gray, info = dicom_to_uint8(ds)
    assert info.voi.startswith("minmax") and "window unusable" in info.voi
    assert gray.min() == 0 and gray.max() == 255


def test_rgb_becomes_luma_like_pillow():
    rgb = np.stack([gradient((24, 24), 0, 255, np.uint8, seed=s) for s in range(3)], axis=-1)
    out, info = decoded_full(make_dataset(rgb, "RGB"))
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(rgb, "RGB").convert("L")))
    assert info.voi == "colour"


def test_resize_reuses_the_image_decoder_resize():
    ds = make_dataset(gradient((60, 40), 0, 4095), bits_stored=12)
    full, _ = dicom_to_uint8(reread(ds))
    for mode in RESIZE_MODES:
        out, _ = decode_dicom(to_bytes(ds), 24, mode)
        expected = resize_stored(full, PreprocessSpec(stored_size=24, resize=mode))
        np.testing.assert_array_equal(out, expected)
        assert out.shape == (24, 24)


# ---------------------------------------------------------------- compressed transfer syntaxes

def test_rle_lossless_decodes_like_the_uncompressed_file():
    ds = make_dataset(gradient((32, 32), 0, 4095), bits_stored=12)
    plain, _ = decoded_full(ds)
    ds.compress(uid.RLELossless)
    rle, info = decoded_full(ds)
    np.testing.assert_array_equal(rle, plain)
    assert info.transfer_syntax == "RLE Lossless" and info.decoder == "pydicom"


def test_jpeg_baseline_like_rsna_decodes_with_pillow():
    gray = gradient((64, 64), 0, 255, np.uint8)
    ds = jpeg_baseline_dataset(gray)
    out, info = decoded_full(ds)
    buffer = io.BytesIO()
    Image.fromarray(gray, "L").save(buffer, "JPEG", quality=90)
    np.testing.assert_array_equal(
        out, decode(buffer.getvalue(), PreprocessSpec(64, fast_jpeg=False)).pixels)
    assert info.transfer_syntax == "JPEG Baseline (Process 1)" and info.voi == "8bit"
    assert info.decoder == "pillow"


def test_compressed_syntax_without_decoder_is_refused_with_what_to_install():
    syntax = uid.JPEGLosslessSV1
    if get_decoder(syntax).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    ds = make_dataset(gradient((16, 16), 0, 4095), bits_stored=12)
    ds.PixelData = encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    with pytest.raises(DicomDecodeError,
                       match="without an installed decoder: JPEG Lossless.*pylibjpeg"):
        decode_dicom(to_bytes(ds), 16)
    # The header is still readable, so ingest can record patient and view for the skip.
    assert read_dicom_info(to_bytes(ds)).transfer_syntax.startswith("JPEG Lossless")


# ---------------------------------------------------------------- refusals

def test_refusals_are_decode_errors():
    assert issubclass(DicomDecodeError, DecodeError)


def test_multi_frame_is_refused():
    ds = make_dataset(np.zeros((3, 16, 16), np.uint16), bits_stored=12)
    assert ds.NumberOfFrames == 3
    with pytest.raises(DicomDecodeError, match="multi-frame DICOM: 3 frames"):
        decode_dicom(to_bytes(ds), 8)


def test_no_pixel_data_is_refused_with_the_kind_of_object(tmp_path):
    data = to_bytes(structured_report())
    with pytest.raises(DicomDecodeError, match="no pixel data.*Basic Text SR.*modality SR"):
        decode_dicom(data, 8)
    info = read_dicom_info(write(tmp_path / "sr.dcm", structured_report()))
    assert info.has_pixels is False and info.patient_id == "PAT-SR"


def test_palette_colour_is_refused():
    ds = make_dataset(gradient((16, 16), 0, 255, np.uint8), "PALETTE COLOR")
    with pytest.raises(DicomDecodeError,
                       match="unsupported DICOM photometric interpretation: PALETTE COLOR"):
        decode_dicom(to_bytes(ds), 8)


def test_truncated_file_is_refused():
    data = to_bytes(make_dataset(gradient((64, 64), 0, 4095), bits_stored=12))
    with pytest.raises(DicomDecodeError, match="truncated"):
        decode_dicom(data[: len(data) // 2], 8)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"\x89PNG\r\n\x1a\n" + bytes(200), "not a DICOM file"),
    (bytes(range(256)) * 4, "not a DICOM file"),
    (bytes(128) + b"DICM" + b"\x02\x00\x10\x00garbage", "no pixel data"),
], ids=["empty", "png", "random-bytes", "dicm-then-garbage"])
def test_non_dicom_bytes_are_refused(data, reason):
    with pytest.raises(DicomDecodeError, match=reason):
        decode_dicom(data, 8)


def test_max_pixels_guard():
    ds = make_dataset(np.zeros((64, 64), np.uint16), bits_stored=12)
    with pytest.raises(DicomDecodeError, match="too large: 64x64 = 4096 pixels > max_pixels 4000"):
        decode_dicom(to_bytes(ds), 8, max_pixels=4000)


# ---------------------------------------------------------------- reading and routing

def test_dataset_without_preamble_is_read():
    ds = make_dataset(gradient((16, 16), 0, 255, np.uint8))
    del ds.file_meta  # a bare dataset: no preamble, no 'DICM', no file meta
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    data = buffer.getvalue()
    assert not is_dicom(data)
    out, info = decode_dicom(data, 16)
    np.testing.assert_array_equal(out, gradient((16, 16), 0, 255, np.uint8))
    assert info.patient_id == "PAT-1" and info.transfer_syntax == "Implicit VR Little Endian"


def test_read_dicom_info_from_a_path_does_not_need_pixels(tmp_path):
    path = write(tmp_path / "a.dcm", make_dataset(gradient((64, 64), 0, 4095), bits_stored=12,
                                                  PatientID="X9", ViewPosition="AP"))
    info = read_dicom_info(path)
    assert (info.patient_id, info.view_position, info.has_pixels, info.voi) == (
        "X9", "AP", True, None)
    assert info.bits_stored == 12 and info.rows == 64


def test_decode_routes_by_content_not_name():
    png = io.BytesIO()
    Image.fromarray(gradient((20, 20), 0, 255, np.uint8), "L").save(png, "PNG")
    decoded = decode(png.getvalue(), PreprocessSpec(10))
    assert decoded.dicom is None and decoded.pixels.shape == (10, 10)
    decoded = decode(to_bytes(make_dataset(gradient((20, 20), 0, 4095), bits_stored=12)),
                     PreprocessSpec(10))
    assert decoded.dicom is not None and decoded.dicom.voi == "minmax"
    assert decoded.pixels.shape == (10, 10)
