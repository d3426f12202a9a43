"""The TensorFlow half of :mod:`pneumo_data.records`: serialize, parse and write shard records.

Derived from :data:`pneumo_data.records.FEATURES`; nothing here names a feature.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import tensorflow as tf

from pneumo_data.common.files import partial_path
from pneumo_data.manifest import shard_entry
from pneumo_data.records import ENCODINGS, FEATURES, check_values

_PARSE_TYPES = {"image": tf.string, "label": tf.int64, "text": tf.string}


def _feature(kind: str, value) -> tf.train.Feature:
    if kind == "label":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    if isinstance(value, str):
        value = value.encode("utf-8")
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def serialize(values: Mapping[str, Any]) -> bytes:
    """The serialized record of ``values`` (one value per feature; image as bytes).

    Deterministic: protobuf would otherwise order the feature map by a per-process hash
    seed, and the same record would get different bytes (and shard sha256s) in every run.
    """
    check_values(dict(values))
    feature = {f.name: _feature(f.kind, values[f.name]) for f in FEATURES}
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def values(record: bytes) -> dict[str, Any]:
    """The Python values of a serialized record (text as str, label as int, image bytes)."""
    feature = tf.train.Example.FromString(record).features.feature
    out: dict[str, Any] = {}
    for f in FEATURES:
        if f.kind == "label":
            out[f.name] = int(feature[f.name].int64_list.value[0])
        else:
            raw = feature[f.name].bytes_list.value[0]
            out[f.name] = raw.decode() if f.kind == "text" else raw
    return out


def parse(serialized, encoding: str | None = None, stored_size: int | None = None,
          names=None) -> dict[str, tf.Tensor]:
    """Parses one serialized record into a dict of tensors; image is [S, S, 1] uint8.

    ``names``: only these features (default: all). The image needs the manifest's
    ``encoding`` and stored size.
    """
    wanted = [f for f in FEATURES if names is None or f.name in names]
    if any(f.kind == "image" for f in wanted) and (encoding is None or stored_size is None):
        raise ValueError("parsing the image needs its encoding and stored size")
    spec = {f.name: tf.io.FixedLenFeature([], _PARSE_TYPES[f.kind]) for f in wanted}
    features = tf.io.parse_single_example(serialized, spec)
    for f in wanted:
        if f.kind == "image":
            features[f.name] = decode_image(features[f.name], encoding, stored_size)
    return features


def decode_image(data, encoding: str, stored_size: int):
    """The stored image ``[S, S, 1]`` uint8 of a record's encoded image bytes."""
    if encoding == "raw":
        image = tf.reshape(tf.io.decode_raw(data, tf.uint8), [stored_size, stored_size, 1])
    elif encoding == "jpeg":
        image = tf.io.decode_jpeg(data, channels=1)
    elif encoding == "png":
        image = tf.io.decode_png(data, channels=1, dtype=tf.uint8)
    else:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    return tf.ensure_shape(image, [stored_size, stored_size, 1])


class ShardWriter:
    """Writes records to the shard's partial name and renames it on :meth:`close`.

    A shard that exists under its final name is always complete. The shard is claimed in the
    output folder's ledger before it is created.
    """

    def __init__(self, out, name: str):
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
        return shard_entry(self.final_path, self.count)
