"""A prepared split's shard files as decoded uint8 images: what the input reader
(:mod:`pneumo_data.reader`) and the device-resident set (:mod:`pneumo_data.resident`) both
read from, below both of them.

* :func:`open_split`: the manifest of a data_dir, the split required and its shards checked;
* :func:`decode_fn`: a serialized record to ``(uint8 [H, W, 1], float32 [1])`` at the model's
  size (stage (b) of :mod:`pneumo_data.preprocess`), optionally with its metadata;
* :func:`class_files` / :func:`class_images`: one class's shard files for an input pipeline,
  and all of its images decoded as one ``[N, H, W, 1]`` tensor;
* :func:`parse_class_weights`, :func:`as_cache`, :func:`options`: the reading settings.
"""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf

from pneumo_data import manifest as manifest_lib
from pneumo_data import records_tf
from pneumo_data.common.errors import UserError
from pneumo_data.config import PipelineConfig
from pneumo_data.preprocess.model_input_tf import to_model_input
from pneumo_data.records import METADATA

AUTOTUNE = tf.data.AUTOTUNE


def parse_class_weights(spec: str | Mapping[str, float] | None,
                        classes: tuple[str, ...]) -> list[float]:
    """Normalized weights in ``classes`` order; None means balanced."""
    if spec is None or spec == "":
        return [1.0 / len(classes)] * len(classes)
    if isinstance(spec, str):
        mapping = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            if not sep:
                raise UserError(f"class_weights {spec!r}: expected 'name=weight,...'")
            try:
                mapping[name.strip()] = float(value)
            except ValueError:
                raise UserError(f"class_weights {spec!r}: {value!r} is not a number") from None
    else:
        mapping = dict(spec)
    unknown = sorted(set(mapping) - set(classes))
    if unknown:
        raise UserError(f"class_weights names unknown class(es) {unknown}; "
                         f"the classes are {list(classes)}")
    weights = [float(mapping.get(c, 0.0)) for c in classes]
    if any(w < 0 or w != w for w in weights):
        raise UserError(f"class_weights must be non-negative numbers, got {mapping}")
    if sum(weights) <= 0:
        raise UserError(f"class_weights must not all be zero, got {mapping}")
    return [w / sum(weights) for w in weights]


def as_cache(cache) -> str:
    if cache is True:
        return "memory"
    if cache is False or cache is None:
        return "none"
    return str(cache)


def decode_fn(m: manifest_lib.Manifest, image_size: int, with_metadata: bool):
    stored = m.image_size
    encoding = m.encoding

    def fn(serialized):
        features = records_tf.parse(serialized, encoding, stored)
        # Stage (b) of the one preprocessing definition: the same integer resize runs in
        # predict and inside every export, so the model sees the same bits everywhere.
        image = to_model_input(features["image"], image_size)
        label = tf.cast(tf.reshape(features["label"], [1]), tf.float32)
        if not with_metadata:
            return image, label
        return image, label, {k: features[k] for k in METADATA}

    return fn


def open_split(data_dir, split: str, config: PipelineConfig) -> manifest_lib.Manifest:
    config.validate()
    m = manifest_lib.load_manifest(data_dir)
    m.require_split(split)
    m.verify(splits=(split,), checksums=config.verify_checksums)
    return m


def options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


def drawn_classes(m: manifest_lib.Manifest, weights) -> list[tuple[str, float]]:
    """The train split's classes the stream draws from (weight above 0), with their weights;
    :class:`UserError` when one of them has no images."""
    drawn = []
    for label, weight in zip(m.classes, weights):
        if weight == 0:
            continue
        if m.count("train", label) == 0:
            raise UserError(f"{m.data_dir}: the train split has no {label!r} images but its "
                            f"class weight is {weight:.3f}")
        drawn.append((label, weight))
    return drawn


def class_files(m, label: str, input_context) -> tuple[list[str], int]:
    """Class ``label``'s shard files of this input pipeline (files ``i, i+P, ...`` of ``P``)
    and the images they hold."""
    files, entries = m.shard_paths("train", label), m.shard_entries("train", label)
    if input_context is not None and input_context.num_input_pipelines > 1:
        n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
        if len(files) < n:
            raise UserError(
                f"class {label!r} has {len(files)} shard(s) for {n} input pipelines; "
                f"re-run prepare with a smaller --shard_mb so every worker gets a file")
        files, entries = files[i::n], entries[i::n]
    return files, sum(e["records"] for e in entries)


def class_images(m, label: str, config: PipelineConfig, deterministic: bool,
                 input_context=None) -> tuple[tf.data.Dataset, int]:
    """A dataset of ONE element, all of this input pipeline's ``label`` images decoded as
    uint8 [N, H, W, 1] with their labels [N, 1], and N: what the batch-level stream and
    the device-resident set (:mod:`pneumo_data.resident`) hold of a class."""
    files, count = class_files(m, label, input_context)
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=len(files),
                       num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.map(decode_fn(m, config.image_size, False), num_parallel_calls=AUTOTUNE,
                deterministic=deterministic)
    return ds.batch(count).take(1), count
