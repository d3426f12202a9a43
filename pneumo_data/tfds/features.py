"""TFDS feature connectors for images stored the way pneumo's shards store them.

TFDS's ``tfds.features.Image`` stores encoded PNG/JPEG bytes and decodes them
with ``tf.image.decode_image``. pneumo's default ``raw`` encoding stores the
pixels themselves (``[S, S]`` uint8, row-major, no header). :class:`RawImage`
is an ``Image`` whose serialized value is exactly those bytes, so:

* ``as_dataset`` reads pneumo's existing records unchanged (the shards and
  their manifest sha256s stay valid);
* it *is* an ``Image`` to TFDS, so ``tfds.visualization.show_examples``,
  ``tfds.as_dataframe`` and ``repr_html`` display it;
* ``features.json`` names it ``pneumo_data.tfds.features.RawImage``: TFDS imports
  that module when it loads the metadata, so reading needs pneumo installed.
  (PNG and JPEG shards use the stock ``tfds.features.Image`` and need only TFDS.)
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["RawImage"]


class RawImage(tfds.features.Image):
    """A fixed-size uint8 image serialized as its raw pixel bytes.

    Args:
      shape: ``(height, width, channels)``, all known.
      dtype: must be uint8.
      encoding_format: must be None (accepted for TFDS's JSON round trip).
      use_colormap: as for ``tfds.features.Image``.
      doc: feature documentation.

    Input (encode): ``[H, W, C]`` or, with one channel, ``[H, W]`` uint8 pixels, or their
    raw bytes (``H * W * C`` of them, as pneumo's records store them).
    Output shape (decode): ``[H, W, C]`` uint8.
    """

    def __init__(self, *, shape, dtype=np.uint8, encoding_format=None, use_colormap=False,
                 doc=None):
        if encoding_format:
            raise ValueError(f"RawImage stores raw pixels; encoding_format must be None, "
                             f"got {encoding_format!r}")
        shape = tuple(shape)
        if len(shape) != 3 or any(d is None or d <= 0 for d in shape):
            raise ValueError(f"RawImage needs a fully known (H, W, C) shape, got {shape}")
        if np.dtype(dtype) != np.uint8:
            raise ValueError(f"RawImage stores uint8 pixels, got dtype {dtype}")
        super().__init__(shape=shape, dtype=np.uint8, encoding_format=None,
                         use_colormap=use_colormap, doc=doc)

    @property
    def _num_bytes(self) -> int:
        return int(np.prod(self._shape))

    def encode_example(self, image):
        if isinstance(image, bytes):  # already pneumo's raw encoding (a record's image)
            if len(image) != self._num_bytes:
                raise ValueError(f"RawImage expects {self._num_bytes} bytes for shape "
                                 f"{self._shape}, got {len(image)}")
            return image
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"RawImage expects uint8 pixels, got {array.dtype}")
        if array.ndim == 2:
            array = array[..., None]
        if array.shape != self._shape:
            raise ValueError(f"RawImage expects shape {self._shape}, got {array.shape}")
        return np.ascontiguousarray(array).tobytes()

    def decode_example(self, example):
        import tensorflow as tf
        pixels = tf.io.decode_raw(example, tf.uint8)
        return tf.reshape(pixels, self._shape)

    def decode_example_np(self, example: bytes) -> np.ndarray:
        if len(example) != self._num_bytes:
            raise ValueError(f"RawImage record has {len(example)} bytes, expected "
                             f"{self._num_bytes} for shape {self._shape}")
        return np.frombuffer(example, dtype=np.uint8).reshape(self._shape)
