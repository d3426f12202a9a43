r"""DICOM files -> the same ``[S, S]`` uint8 grayscale that stage (a) makes of any other image.

Grey levels, in this order (DICOM PS3.3 C.11, "grayscale pipeline"):

1. **Stored values** from pydicom (``Dataset.pixel_array``): bits beyond *Bits Stored* masked,
   signed data sign-extended, compressed transfer syntaxes decoded by whichever pydicom plugin is
   installed (Pillow covers JPEG baseline/extended and JPEG 2000; RLE and Deflate are built in;
   JPEG Lossless, JPEG-LS and HTJ2K need the ``dicom`` extra: pylibjpeg + pylibjpeg-libjpeg +
   pylibjpeg-openjpeg). Pillow is chosen whenever it can decode the syntax, so a JPEG gives the
   same pixels inside or outside a DICOM; :attr:`DicomInfo.decoder` records the plugin.
2. **Modality LUT**: *Modality LUT Sequence* if present, else ``value * RescaleSlope +
   RescaleIntercept`` when either tag is present.
3. **VOI** (what a radiologist would see), the first applicable of:

   * *VOI LUT Sequence* (first item): the table maps each value; the table's own output range
     ``[min(LUTData), max(LUTData)]`` is stretched linearly onto 0..255. (The table's range, not
     ``2**LUTDescriptor[2]``: real files often declare 16 bits and fill 12.)
   * *Window Center* / *Window Width* (first value when multi-valued), with *VOI LUT Function*
     LINEAR (the default), LINEAR_EXACT or SIGMOID exactly as PS3.3 C.11.2.1.2 defines them,
     with the window's output range ``[y_min, y_max]`` mapped linearly onto 0..255. A window that
     the function cannot use (width < 1 for LINEAR, <= 0 otherwise) falls through to the next rule
     and the fall-back is recorded in :attr:`DicomInfo.voi`.
   * No VOI: **8-bit** unsigned data without a modality transform is used as it is (it is already
     display-ready; RSNA's JPEG-baseline DICOMs are such files); everything else (**12- and
     16-bit**, signed, rescaled) is stretched linearly from the image's own minimum..maximum onto
     0..255. The nominal range of *Bits Stored* is not used: 12-bit data declared as 16 bits, or a
     detector that fills 3000 of 65536 levels, would come out nearly black.

4. **MONOCHROME1** (0 = white) is inverted (``255 - v``) so that bone is always bright.
5. Rounded to the nearest integer, clipped to 0..255, then resized exactly like other images
   (:func:`pneumo_data.preprocess.stored.resize_stored`: ``stretch`` or ``pad``, Pillow bilinear
   with antialiasing, one axis at a time), the same step a SavedModel's ``serve_pixels`` runs
   at full resolution, after windowing (as a viewer would show it).

Steps 2, 3 and the rounding are computed once, in float64, over every possible stored value (256
or 65536) and the image is mapped with one table lookup: the per-pixel result exactly, and for a
2048x2048 16-bit image 2-3.5x cheaper than per-pixel float32 arithmetic (about 50 -> 14-22 ms on
a shared 2-vCPU machine).

RGB and YBR (pydicom converts YBR to RGB) become gray with Pillow's ITU-R 601 luma, as RGB JPEGs do
in :mod:`pneumo_data.preprocess.stored`; window tags do not apply to colour data.

Refused with :class:`DicomDecodeError` (a :class:`pneumo_data.preprocess.DecodeError`, so ingest
records a skip with the reason): non-DICOM bytes, truncated or corrupt files, datasets without
pixel data (structured reports, presentation states, key object selections...), float pixel data,
multi-frame images (``NumberOfFrames > 1``: a series, not one radiograph), PALETTE COLOR and other
photometric interpretations, colour data above 8 bits, compressed transfer syntaxes with no
installed decoder (the reason names the packages to install), and images larger than
``max_pixels``.

Checked against pydicom 3.0 (``pydicom.pixels.apply_modality_lut``, ``apply_voi``,
``apply_windowing``) in ``tests/test_dicom.py``.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import numpy as np
from PIL import Image

from pneumo_data.preprocess.spec import DEFAULT_MAX_PIXELS, DecodeError, PreprocessSpec
from pneumo_data.preprocess.stored import resize_stored

__all__ = ["DicomDecodeError", "DicomInfo", "decode_dicom", "dicom_to_uint8", "read_dicom_info",
           "is_dicom", "looks_like_dicom"]

_PREAMBLE = 128
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
_MISSING_DECODER_HINT = ("install a decoder with pip install 'pneumo[dicom]' "
                         "(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)")


class DicomDecodeError(DecodeError):
    """The DICOM file cannot become one grayscale image; ``str(error)`` is the reason."""


@dataclasses.dataclass(frozen=True)
class DicomInfo:
    """What ingest records about a DICOM file (all tags optional in real files).

    ``voi`` says how grey levels were mapped to 8 bit (``lut``, ``window``, ``window-sigmoid``,
    ``minmax``, ``8bit``, ``colour``, with a note when a rule fell through) and ``decoder`` which
    pydicom plugin decoded compressed pixel data (``native`` for uncompressed); both are ``None``
    for :func:`read_dicom_info`, which does not decode pixels.
    """

    patient_id: str | None
    view_position: str | None
    modality: str | None
    body_part: str | None
    photometric: str | None
    rows: int | None
    columns: int | None
    bits_allocated: int | None
    bits_stored: int | None
    signed: bool | None
    frames: int
    transfer_syntax: str | None
    sop_class: str | None
    has_pixels: bool
    voi: str | None = None
    decoder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def manifest_dict(self) -> dict[str, Any]:
        """What a manifest row records (the patient id is already the row's own)."""
        keys = ("voi", "decoder", "transfer_syntax", "photometric", "bits_stored", "rows",
                "columns", "modality", "body_part", "view_position")
        return {k: getattr(self, k) for k in keys}


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise DicomDecodeError("DICOM file, but pydicom is not installed "
                               "(pip install pydicom)") from None
    return pydicom


def is_dicom(data: bytes) -> bool:
    """True when ``data`` is a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    return data[_PREAMBLE:_PREAMBLE + 4] == b"DICM"


def _bare_dataset(data: bytes) -> bool:
    # A dataset written without preamble and file meta starts with a little-endian tag of
    # group 0002 or 0008 (old ACR-NEMA style exports still do this).
    return data[:2] in (b"\x02\x00", b"\x08\x00")


def _read(source: bytes | str | os.PathLike, header_only: bool):
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            head = handle.read(_PREAMBLE + 4)
        fp: Any = os.fspath(source)
    else:
        head, fp = source[:_PREAMBLE + 4], io.BytesIO(source)
    if not head:
        raise DicomDecodeError("empty file (0 bytes)")
    force = False
    if not is_dicom(head):
        if not _bare_dataset(head):
            raise DicomDecodeError("not a DICOM file (no 'DICM' marker at byte 128)")
        force = True
    try:
        # defer_size: the header pass skips large values (pixel data) without reading them but
        # still records that they exist.
        ds = pydicom.dcmread(fp, force=force, defer_size="256 KB" if header_only else None)
    except InvalidDicomError as error:
        raise DicomDecodeError(f"not a valid DICOM file: {error}") from None
    except (EOFError, ValueError, KeyError, TypeError, OSError, OverflowError) as error:
        raise DicomDecodeError(f"corrupt or truncated DICOM: {error}") from None
    if force and "TransferSyntaxUID" not in ds.file_meta:
        # No file meta: the encoding pydicom detected while reading is the transfer syntax.
        from pydicom import uid
        implicit, little = ds.original_encoding
        if little:
            ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit
                                              else uid.ExplicitVRLittleEndian)
    return ds


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _int(ds, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _info(ds, voi: str | None = None, decoder: str | None = None) -> DicomInfo:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    sop = ds.get("SOPClassUID")
    representation = _int(ds, "PixelRepresentation")
    return DicomInfo(
        patient_id=_text(ds, "PatientID"),
        view_position=(_text(ds, "ViewPosition") or "").upper() or None,
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        photometric=_text(ds, "PhotometricInterpretation"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        bits_allocated=_int(ds, "BitsAllocated"),
        bits_stored=_int(ds, "BitsStored"),
        signed=None if representation is None else representation == 1,
        frames=_int(ds, "NumberOfFrames") or 1,
        transfer_syntax=getattr(syntax, "name", None) or (str(syntax) if syntax else None),
        sop_class=getattr(sop, "name", None) or (str(sop) if sop else None),
        has_pixels="PixelData" in ds,
        voi=voi,
        decoder=decoder,
    )


def read_dicom_info(source: bytes | str | os.PathLike) -> DicomInfo:
    """Reads the tags ingest records, without decoding pixels (for planning: patient, view).

    Args:
      source: the file's bytes, or a path (then pixel data is skipped, not read).

    Raises:
      DicomDecodeError: not DICOM, or the header is unreadable.
    """
    return _info(_read(source, header_only=True))


# ---------------------------------------------------------------- checks before decoding

def _refuse_unusable(ds, max_pixels: int) -> str:
    """Raises for files that cannot become one grayscale image; returns the decoder plugin."""
    info = _info(ds)
    if not info.has_pixels:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DicomDecodeError("float pixel data (parametric map), not a radiograph")
        kind = info.sop_class or "unknown SOP class"
        raise DicomDecodeError(
            f"no pixel data: not an image ({kind}, modality {info.modality or 'unknown'})")
    if info.frames > 1:
        raise DicomDecodeError(
            f"multi-frame DICOM: {info.frames} frames (a series, not one radiograph)")
    if not info.rows or not info.columns:
        raise DicomDecodeError(f"image has no pixels (rows {info.rows}, columns {info.columns})")
    if info.rows * info.columns > max_pixels:
        raise DicomDecodeError(
            f"image too large: {info.columns}x{info.rows} = {info.rows * info.columns} pixels "
            f"> max_pixels {max_pixels} (--max_pixels raises the limit)")
    photometric = (info.photometric or "").upper()
    if photometric not in _MONOCHROME + _COLOUR:
        raise DicomDecodeError(
            f"unsupported DICOM photometric interpretation: {info.photometric or 'missing'} "
            f"(supported: {', '.join(_MONOCHROME + _COLOUR)})")
    if photometric in _COLOUR and info.bits_allocated != 8:
        raise DicomDecodeError(f"unsupported DICOM colour depth: {photometric} with "
                               f"{info.bits_allocated} bits allocated (only 8-bit colour)")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax.is_compressed:
        from pydicom.pixels import get_decoder
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise DicomDecodeError(
                f"unsupported DICOM transfer syntax: {syntax.name} ({syntax}), pydicom has "
                f"no decoder for it") from None
        if not decoder.is_available:
            raise DicomDecodeError(
                f"DICOM transfer syntax without an installed decoder: {syntax.name} "
                f"({syntax}); {_MISSING_DECODER_HINT}")
        # Pillow first when it can: the same JPEG then decodes to the same pixels whether it sits
        # in a .jpg or a .dcm, and whether or not pylibjpeg happens to be installed (its IDCT
        # differs from libjpeg-turbo's by 1 grey level on a few percent of pixels).
        plugins = decoder.available_plugins
        return "pillow" if "pillow" in plugins else plugins[0]
    return "native"


# ---------------------------------------------------------------- grey-level mapping

def _first(value) -> float:
    """First value of a possibly multi-valued DS element."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _modality(values: np.ndarray, ds) -> tuple[np.ndarray, bool]:
    """Returns (modality values as float64, transformed?)."""
    if ds.get("ModalityLUTSequence"):
        # Our own lookup: pydicom 3.0's apply_modality_lut only knows 8- and 16-bit tables.
        try:
            return _lookup(values, ds, ds.ModalityLUTSequence[0])[0], True
        except (AttributeError, ValueError, TypeError, IndexError) as error:
            raise DicomDecodeError(f"unusable Modality LUT Sequence: {error}") from None
    values = values.astype(np.float64, copy=False)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = _first(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = _first(ds.get("RescaleIntercept", 0.0) or 0.0)
        if slope != 1.0 or intercept != 0.0:
            return values * slope + intercept, True
    return values, False


def _lut_table(ds, item) -> tuple[np.ndarray, int]:
    """(table, first mapped value) of a Modality or VOI LUT Sequence item."""
    entries, first_map, _bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):  # VR OW: 16-bit words in the file's byte order
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
        table = np.frombuffer(bytes(data), dtype="<u2" if little else ">u2")
    elif isinstance(data, (int, float)):
        table = np.asarray([data], dtype=np.float64)
    else:
        table = np.asarray(list(data), dtype=np.float64)
    table = np.asarray(table[:entries], dtype=np.float64)
    if table.size == 0:
        raise ValueError("empty LUT Data")
    return table, first_map


def _lookup(values: np.ndarray, ds, item) -> tuple[np.ndarray, np.ndarray]:
    """(table[value - first mapped], table): values below the first entry take the first, above
    the last take the last (PS3.3 C.11.1.1 / C.11.2.1.1)."""
    table, first_map = _lut_table(ds, item)
    index = np.rint(values).astype(np.int64) - first_map
    np.clip(index, 0, table.size - 1, out=index)
    return table[index], table


def _apply_lut(values: np.ndarray, ds) -> np.ndarray:
    out, table = _lookup(values, ds, ds.VOILUTSequence[0])
    low, high = float(table.min()), float(table.max())
    if high == low:
        return np.zeros(values.shape)
    return (out - low) * (255.0 / (high - low))


def _apply_window(x: np.ndarray, ds) -> tuple[np.ndarray, str]:
    center = _first(ds.WindowCenter)
    width = _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"window width {width} < 1 for LINEAR")
        if width == 1:  # a threshold at center - 0.5 (PS3.3 C.11.2.1.2.1)
            return np.where(x > center - 0.5, 255.0, 0.0), "window"
        return (x - (center - 0.5)) * (255.0 / (width - 1)) + 127.5, "window"
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width {width} <= 0 for LINEAR_EXACT")
        return (x - center) * (255.0 / width) + 127.5, "window"
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width {width} <= 0 for SIGMOID")
        with np.errstate(over="ignore"):  # exp overflows to inf far below the centre: 0
            return 255.0 / (1 + np.exp((-4.0 / width) * (x - center))), "window-sigmoid"
    raise ValueError(f"unknown VOI LUT Function {function!r}")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _grey_levels(stored: np.ndarray, ds, eight_bit: bool,
                 present: np.ndarray | None) -> tuple[np.ndarray, str]:
    """The grayscale pipeline applied elementwise to ``stored`` values -> (uint8, rule).

    ``present`` (bool mask over ``stored``, or None for all) says which values the image holds:
    the min/max rule stretches between the smallest and largest of those.
    """
    values, transformed = _modality(stored, ds)
    notes = []
    if ds.get("VOILUTSequence"):
        try:
            return _to_uint8(_apply_lut(values, ds)), "lut"
        except (AttributeError, ValueError, TypeError, IndexError) as error:
            notes.append(f"VOI LUT unusable: {error}")
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            mapped, rule = _apply_window(values, ds)
            return _to_uint8(mapped), rule if not notes else f"{rule} ({'; '.join(notes)})"
        except (ValueError, TypeError, IndexError) as error:
            notes.append(f"window unusable: {error}")
    suffix = f" ({'; '.join(notes)})" if notes else ""
    if not transformed and eight_bit:
        return _to_uint8(values), "8bit" + suffix
    held = values if present is None else values[present]
    low, high = float(held.min()), float(held.max())
    if high == low:
        return np.zeros(values.shape, np.uint8), "minmax (constant image)" + suffix
    return _to_uint8((values - low) * (255.0 / (high - low))), "minmax" + suffix


def _monochrome_to_uint8(pixels: np.ndarray, ds) -> tuple[np.ndarray, str]:
    """Stored values -> uint8 through the grayscale pipeline.

    For 8- and 16-bit integer data (every radiograph) the pipeline runs once over all 256 or
    65536 possible stored values, in float64, and the image is one table lookup: exactly the
    per-pixel result, and several times cheaper than float32 arithmetic on a 2048x2048 image.
    """
    kind, size = pixels.dtype.kind, pixels.dtype.itemsize
    if kind not in "ui" or size > 2:
        return _grey_levels(pixels, ds, False, None)
    bits = 8 * size
    index = pixels.view(f"uint{bits}")
    stored = np.arange(2 ** bits, dtype=np.float64)
    if kind == "i":  # offset binary keeps the order: -32768 -> 0, 0 -> 32768
        index = index ^ np.array(1 << (bits - 1), index.dtype)
        stored -= 2 ** (bits - 1)
    if ds.get("ModalityLUTSequence"):  # a table need not be monotonic: the values held
        present = np.bincount(index.ravel(), minlength=stored.size) > 0
    else:  # monotonic: the stored range held is enough
        present = np.zeros(stored.size, bool)
        present[int(index.min()):int(index.max()) + 1] = True
    table, rule = _grey_levels(stored, ds, kind == "u" and bits == 8, present)
    return table[index], rule


def dicom_to_uint8(ds, max_pixels: int = DEFAULT_MAX_PIXELS
                   ) -> tuple[np.ndarray, DicomInfo]:
    """Full-resolution 8-bit grayscale of a pydicom dataset, and its info (with ``voi``).

    Output shape: ``[Rows, Columns]`` uint8, bone bright.

    Raises:
      DicomDecodeError: see the module docstring.
    """
    plugin = _refuse_unusable(ds, max_pixels)
    try:
        if plugin != "native":
            ds.pixel_array_options(decoding_plugin=plugin)
        pixels = ds.pixel_array
    except (ValueError, EOFError, AttributeError, KeyError, TypeError, RuntimeError,
            NotImplementedError, OSError) as error:
        raise DicomDecodeError(f"corrupt or truncated pixel data: {error}") from None
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric in _COLOUR:
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise DicomDecodeError(f"{photometric} data with shape {pixels.shape}")
        gray = np.asarray(Image.fromarray(pixels.astype(np.uint8), "RGB").convert("L"))
        return gray, _info(ds, voi="colour", decoder=plugin)
    if pixels.ndim != 2:
        raise DicomDecodeError(f"expected one grayscale frame, got pixel shape {pixels.shape}")
    gray, rule = _monochrome_to_uint8(pixels, ds)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return gray, _info(ds, voi=rule, decoder=plugin)


def looks_like_dicom(data: bytes) -> bool:
    """True for DICOM bytes, with or without the Part 10 preamble (by content, not by name);
    ``data`` may be just the file's first 132 bytes."""
    return is_dicom(data) or _bare_dataset(data)


def decode_dicom(data: bytes, spec: PreprocessSpec) -> tuple[np.ndarray, DicomInfo]:
    """DICOM bytes -> ``(pixels [S, S] uint8, DicomInfo)``: :func:`dicom_to_uint8`, then the
    same resize as every other image (:func:`pneumo_data.preprocess.stored.resize_stored`).
    ``DicomInfo.voi`` names the grey-level rule.

    Raises:
      DicomDecodeError: (a ``DecodeError``) with the reason, for every unusable input.
    """
    ds = _read(data, header_only=False)
    gray, info = dicom_to_uint8(ds, spec.max_pixels)
    return resize_stored(gray, spec), info
