"""The one decode entry point: a file (bytes or path) + :class:`PreprocessSpec` -> the stored
uint8 ``[S, S]`` image.

Ingest, ``predict``, the TFDS builder, ``visualize`` and the benchmarks all call
:func:`decode`; DICOM is recognised by content (not by file name) and goes through
:mod:`pneumo_data.preprocess.dicom`, everything else through Pillow
(:mod:`pneumo_data.preprocess.stored`). The serving graph's TensorFlow twin of the Pillow path
is :func:`pneumo_data.preprocess.stored_tf.decode_stored_tf`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from pneumo_data.preprocess.dicom import DicomInfo, decode_dicom, looks_like_dicom
from pneumo_data.preprocess.spec import DEFAULT_SPEC, DecodeError, PreprocessSpec
from pneumo_data.preprocess.stored import decode_stored


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A decoded file: the stored image and, for DICOM, what its header said."""

    pixels: np.ndarray          # uint8 [S, S]
    dicom: DicomInfo | None = None


def decode(source: bytes | str | os.PathLike, spec: PreprocessSpec = DEFAULT_SPEC) -> Decoded:
    """Decodes a file's bytes (or the file at a path) into the stored image of ``spec``.

    Raises:
      DecodeError: empty, truncated, non-image, too large or unsupported input, with a short
        human reason (ingest records it as the file's skip reason). Reading a path can also
        raise OSError.
    """
    data = source if isinstance(source, (bytes, bytearray, memoryview)) \
        else Path(source).read_bytes()
    data = bytes(data)
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if looks_like_dicom(data):
        pixels, info = decode_dicom(data, spec)
        return Decoded(pixels, info)
    return Decoded(decode_stored(data, spec))
