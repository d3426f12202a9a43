"""Stage 4 of ingest: the TFRecord shard format (write and parse live together).

One set of shards per split x class, so every class is its own stream for the
rebalancing sampler. File names are readable:
``train-pneumonia-00001-of-00004.tfrecord``.

Each record (a ``tf.train.Example``) carries:

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

Stored encodings (measured by ``python -m benchmarks.encoding``): ``raw``
(default; lossless and the fastest to decode), ``jpeg`` (about 4x smaller, on
average under one grey level of error at quality 95) and ``png`` (lossless,
about 2x smaller than raw but several times slower to encode and decode).
"""

from __future__ import annotations

import io
import os

import numpy as np

from pneumo_data.common.files import file_sha256, partial_path

ENCODINGS = ("raw", "jpeg", "png")
SHARD_SUFFIX = ".tfrecord"


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


def make_example(image_bytes: bytes, label: int, subtype: str, patient_id: str,
                 source_path: str, source_sha256: str) -> bytes:
    import tensorflow as tf

    def _bytes(value):
        if isinstance(value, str):
            value = value.encode("utf-8")
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    feature = {
        "image": _bytes(image_bytes),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "subtype": _bytes(subtype),
        "patient_id": _bytes(patient_id),
        "source_path": _bytes(source_path),
        "source_sha256": _bytes(source_sha256),
    }
    # deterministic: protobuf would otherwise order the feature map by a per-process hash
    # seed, and the same record would get different bytes (and shard sha256s) in every run.
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def parse_example(serialized, encoding: str, stored_size: int):
    """Parses one serialized record into a dict of tensors; image is [S, S, 1] uint8."""
    import tensorflow as tf
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "subtype": tf.io.FixedLenFeature([], tf.string),
        "patient_id": tf.io.FixedLenFeature([], tf.string),
        "source_path": tf.io.FixedLenFeature([], tf.string),
        "source_sha256": tf.io.FixedLenFeature([], tf.string),
    }
    features = tf.io.parse_single_example(serialized, spec)
    data = features["image"]
    if encoding == "raw":
        image = tf.reshape(tf.io.decode_raw(data, tf.uint8), [stored_size, stored_size, 1])
    elif encoding == "jpeg":
        image = tf.io.decode_jpeg(data, channels=1)
    elif encoding == "png":
        image = tf.io.decode_png(data, channels=1, dtype=tf.uint8)
    else:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    features["image"] = tf.ensure_shape(image, [stored_size, stored_size, 1])
    return features


class ShardWriter:
    """Writes records to the shard's partial name and renames it on :meth:`close`.

    A shard that exists under its final name is always complete. The shard is claimed in the
    output folder's ledger before it is created.
    """

    def __init__(self, out, name: str):
        import tensorflow as tf
        self.final_path = out.claim(name)
        self.partial_path = partial_path(self.final_path)
        self._writer = tf.io.TFRecordWriter(str(self.partial_path))
        self.count = 0

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.count += 1

    def close(self) -> dict:
        """Finishes the shard; returns its manifest entry."""
        self._writer.close()
        os.replace(self.partial_path, self.final_path)
        return {
            "file": self.final_path.name,
            "records": self.count,
            "bytes": self.final_path.stat().st_size,
            "sha256": file_sha256(self.final_path),
        }
