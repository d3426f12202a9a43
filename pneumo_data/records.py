"""The shard record: the one place its features are declared.

One set of shards per split x class, so every class is its own stream for the rebalancing
sampler. File names are readable: ``train-pneumonia-00001-of-00004.tfrecord``.

Each record is a ``tf.train.Example`` whose features are :data:`FEATURES`:

=============== ======= ==================================================
key             type    value
=============== ======= ==================================================
image           bytes   the stored image, encoded as the manifest says
label           int64   0 normal, 1 pneumonia
subtype         bytes   none / bacterial / viral / unknown
patient_id      bytes   patient id (or ``file:<relpath>``)
source_path     bytes   path of the source file relative to the source dir
source_sha256   bytes   sha256 of the source file's bytes
=============== ======= ==================================================

Everything that reads or writes records derives from :data:`FEATURES`, as TFDS derives a
dataset's serializer, parser and ``features.json`` from one ``FeaturesDict``: the writer and
the parser (:mod:`pneumo_data.records_tf`, the TensorFlow half) and the TFDS features
(:func:`pneumo_data.tfds.metadata.feature_dict`). This module imports no TensorFlow.

Stored encodings (measured by ``python -m benchmarks.encoding``): ``raw`` (default; lossless
and the fastest to decode), ``jpeg`` (about 4x smaller, on average under one grey level of
error at quality 95) and ``png`` (lossless, about 2x smaller than raw but several times slower
to encode and decode).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

ENCODINGS = ("raw", "jpeg", "png")
SHARD_SUFFIX = ".tfrecord"
KINDS = ("image", "label", "text")


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature of the record.

    ``kind``: ``image`` (the encoded stored image, bytes), ``label`` (the class index, int64)
    or ``text`` (a UTF-8 string, stored as bytes).
    """

    name: str
    kind: str
    doc: str


FEATURES = (
    Feature("image", "image", "the stored image, encoded as the manifest says"),
    Feature("label", "label", "0 normal, 1 pneumonia"),
    Feature("subtype", "text", "none, bacterial, viral or unknown"),
    Feature("patient_id", "text", "patient id parsed from the file name"),
    Feature("source_path", "text", "source file, relative to the source folder"),
    Feature("source_sha256", "text", "sha256 of the source file's bytes"),
)
NAMES = tuple(f.name for f in FEATURES)
# What an evaluation stream yields beside image and label (``with_metadata=True``).
METADATA = ("patient_id", "subtype", "source_path")
assert all(f.kind in KINDS for f in FEATURES) and set(METADATA) <= set(NAMES)


def shard_name(split: str, label: str, index: int, count: int) -> str:
    return f"{split}-{label}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def encode_image(array: np.ndarray, encoding: str, jpeg_quality: int = 95) -> bytes:
    """Encodes a [H, W] uint8 array for storage."""
    if encoding == "raw":
        return np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    from PIL import Image
    buffer = io.BytesIO()
    if encoding == "jpeg":
        Image.fromarray(array, "L").save(buffer, "JPEG", quality=jpeg_quality)
    elif encoding == "png":
        Image.fromarray(array, "L").save(buffer, "PNG", compress_level=1)
    else:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    return buffer.getvalue()


def check_values(values: dict) -> None:
    """Raises ValueError unless ``values`` has exactly the record's features."""
    if set(values) != set(NAMES):
        raise ValueError(f"a record has the features {list(NAMES)}, got {sorted(values)}")
