"""EXIF orientation of JPEG and PNG bytes, read the way Pillow's ``exif_transpose`` applies it.

The byte walk here and its TensorFlow twin (:mod:`pneumo_data.preprocess.exif_tf`) read the
same segments in the same order, so both halves of stage (a) orient an image alike.
"""

from __future__ import annotations

import struct

import numpy as np

MAX_SEGMENTS = 64  # JPEG segments / PNG chunks walked when looking for EXIF
MAX_IFD_ENTRIES = 256
ORIENTATION_TAG = 0x0112
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


def _u16(data: bytes, pos: int, little: bool) -> int | None:
    if pos < 0 or pos + 2 > len(data):
        return None
    return struct.unpack_from("<H" if little else ">H", data, pos)[0]


def _u32(data: bytes, pos: int, little: bool) -> int | None:
    if pos < 0 or pos + 4 > len(data):
        return None
    return struct.unpack_from("<I" if little else ">I", data, pos)[0]


def _jpeg_tiff_offset(data: bytes) -> int | None:
    """Offset of the TIFF header of the first ``APP1 Exif`` segment before SOS."""
    pos = 2
    for _ in range(MAX_SEGMENTS):
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no EXIF before them
            return None
        length = _u16(data, pos + 2, False)
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            return pos + 10
        pos += 2 + length
    return None


def _png_tiff_offset(data: bytes) -> int | None:
    """Offset of the TIFF header of the first ``eXIf`` chunk before IDAT."""
    pos = 8
    for _ in range(MAX_SEGMENTS):
        if pos + 8 > len(data):
            return None
        kind = data[pos + 4:pos + 8]
        if kind in (b"IDAT", b"IEND"):
            return None
        if kind == b"eXIf":
            return pos + 8
        pos += 12 + _u32(data, pos, False)
    return None


def _tiff_orientation(data: bytes, tiff: int) -> int:
    order = data[tiff:tiff + 2]
    if order not in (b"II", b"MM"):
        return 1
    little = order == b"II"
    ifd = _u32(data, tiff + 4, little)
    count = _u16(data, tiff + ifd, little) if ifd is not None else None
    if count is None:
        return 1
    for i in range(min(count, MAX_IFD_ENTRIES)):
        entry = tiff + ifd + 2 + 12 * i
        if _u16(data, entry, little) != ORIENTATION_TAG:
            continue
        kind = _u16(data, entry + 2, little)
        value = (_u16(data, entry + 8, little) if kind == 3
                 else _u32(data, entry + 8, little) if kind == 4 else None)
        return value if value is not None and 1 <= value <= 8 else 1
    return 1


def exif_orientation(data: bytes) -> int:
    """EXIF orientation (1..8; 1 when absent or unreadable) of JPEG or PNG bytes.

    Reads IFD0's tag 0x0112 from the first ``APP1 Exif`` segment before the scan
    (JPEG) or the first ``eXIf`` chunk before the image data (PNG): the same walk
    as :func:`exif_orientation_tf`, at most 64 segments and 256 IFD entries.
    """
    if data[:3] == JPEG_SIGNATURE:
        tiff = _jpeg_tiff_offset(data)
    elif data[:8] == PNG_SIGNATURE:
        tiff = _png_tiff_offset(data)
    else:
        return 1
    return 1 if tiff is None else _tiff_orientation(data, tiff)


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Applies EXIF ``orientation`` to ``[H, W]`` as Pillow's ``exif_transpose`` does."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],               # FLIP_LEFT_RIGHT
        3: lambda a: a[::-1, ::-1],            # ROTATE_180
        4: lambda a: a[::-1, :],               # FLIP_TOP_BOTTOM
        5: lambda a: a.T,                      # TRANSPOSE
        6: lambda a: np.rot90(a, -1),          # ROTATE_270 (clockwise 90)
        7: lambda a: a[::-1, ::-1].T,          # TRANSVERSE
        8: lambda a: np.rot90(a, 1),           # ROTATE_90 (counter-clockwise)
    }
    return np.ascontiguousarray(ops.get(orientation, ops[1])(array))

