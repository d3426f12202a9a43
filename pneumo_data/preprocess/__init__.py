"""The one definition of "file bytes -> model input", in two stages.

Stage (a), :func:`decode`: a file's bytes -> the stored uint8 ``[S, S]`` grayscale image
(what ingest writes into the shards; what ``pneumo_eval.predict`` makes of a file). Stage (b),
:func:`~pneumo_data.preprocess.model_input_tf.to_model_input`: stored
``[..., S, S, 1]`` -> model input ``[..., M, M, 1]`` (what the pipeline does on the fly,
``predict`` does before the model, and every export of :mod:`pneumo_models.export` and
:mod:`pneumo_models.litert` does inside its graph). :class:`PreprocessSpec` holds the settings
of stage (a); prepare records them in the manifest (``preprocess``), the exports in their
metadata.

Stage (a) exists twice, because ingest and ``predict`` want Pillow (every format,
no TensorFlow) and a SavedModel needs TensorFlow ops. The two agree by
construction, step by step:

* JPEG DCT scale. Pillow: ``Image.draft("L", (2S, 2S))``, the largest of 8/4/2/1
  keeping both sides >= 2S. TF: ``decode_jpeg(ratio=r)`` with the same r, computed
  from ``extract_jpeg_shape``.
* JPEG IDCT. Pillow: libjpeg ISLOW (its default). TF: ``dct_method="INTEGER_ACCURATE"``.
* Colour JPEG -> gray. Pillow: libjpeg's grayscale output (Y). TF: ``channels=1``, the
  same libjpeg conversion.
* CMYK JPEG -> gray. Pillow: CMYK -> RGB -> luma. TF: ``channels=3`` (the same
  CMYK -> RGB), then luma.
* PNG, any bit depth. Both: the high byte of 16-bit samples; TF decodes
  ``decode_png(dtype=uint16) >> 8`` (8-bit samples come back exactly).
* RGB(A)/palette -> gray. Both: Pillow's integer luma
  ``(R*19595 + G*38470 + B*7471 + 2^15) >> 16`` (:func:`luma`, :func:`luma_tf`).
* EXIF orientation. :func:`exif_orientation` and :func:`exif_orientation_tf` walk the
  same bytes the same way (JPEG APP1, PNG eXIf) and transpose as Pillow's
  ``exif_transpose``.
* Resize to S (``stretch`` or ``pad``). Pillow: ``resize(BILINEAR)`` one axis at a
  time, horizontal first (:func:`pil_bilinear_resize`). TF:
  :func:`pil_bilinear_resize_tf`, Pillow's algorithm (coefficients in float64, 22-bit
  fixed point, the same pass order) in TF ops. (Pillow 13 runs the vertical pass first
  when the height shrinks much more than the width, python-pillow/Pillow#9549; calling
  one pass per axis keeps the stored pixels independent of the Pillow version.)

Both decoders are libjpeg-turbo / libpng, so equal options give equal pixels;
the resize is integer arithmetic once the coefficients are fixed, so equal
coefficients give equal pixels. ``tests/test_preprocess.py`` checks the result
bit for bit on generated and real images. Formats other than JPEG and PNG (BMP,
TIFF, GIF, WebP) are Pillow-only: the TF path refuses them with a clear error,
and DICOM too (decode it outside the graph and send pixels).

Stage (b) is a separable linear map with integer weights: an exact box average
when shrinking (TF's ``area``), half-pixel bilinear when growing, computed in
int32 and rounded once (half to even). Integer arithmetic gives the same bits in
``tf.data``, eagerly, in a SavedModel and in a LiteRT flatbuffer (where it is
GATHER/MUL/SUM on int32, which int8 quantization leaves alone).

The package, one module per step, each numpy/Pillow half beside its TensorFlow twin:

=================== ======================== ==================================
step                numpy / Pillow           TensorFlow
=================== ======================== ==================================
settings, errors    :mod:`.spec`
the entry point     :mod:`.decode` (DICOM    :mod:`.stored_tf`
                    by content, else Pillow) (``decode_stored_tf``)
EXIF orientation    :mod:`.exif`             :mod:`.exif_tf`
stage (a)           :mod:`.stored`           :mod:`.stored_tf`
DICOM               :mod:`.dicom` (pydicom)  (none: send pixels to ``serve_pixels``)
stage (b)           :mod:`.model_input`      :mod:`.model_input_tf`
=================== ======================== ==================================

Importing the package (or any module without ``_tf``) imports no TensorFlow: ingest and
``predict``'s decoding do not load it. The ``_tf`` modules import it.
"""

from __future__ import annotations

from pneumo_data.preprocess.decode import Decoded, decode
from pneumo_data.preprocess.dicom import DicomDecodeError, DicomInfo
from pneumo_data.preprocess.model_input import to_model_input_np
from pneumo_data.preprocess.spec import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_SPEC,
    DEFAULT_STORED_SIZE,
    RESIZE_MODES,
    VERSION,
    DecodeError,
    PreprocessSpec,
)

__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_SPEC", "DEFAULT_STORED_SIZE", "RESIZE_MODES",
           "VERSION", "DecodeError", "Decoded", "DicomDecodeError", "DicomInfo",
           "PreprocessSpec", "decode", "to_model_input_np"]
