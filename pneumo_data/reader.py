"""The one input reader: a prepared folder to a tf.data stream, for training or evaluation.

::

    import pneumo_data
    from pneumo_data.config import PipelineConfig
    train = pneumo_data.read("data/xray", PipelineConfig(batch_size=32), mode="train", seed=0)
    val = pneumo_data.read("data/xray", PipelineConfig(batch_size=32), mode="eval", split="val")
    # the same, with keywords (every default comes from PipelineConfig):
    train = pneumo_data.train_dataset("data/xray", batch_size=32, image_size=150, seed=0)
    steps = pneumo_data.steps_per_epoch("data/xray", batch_size=32)
    val = pneumo_data.eval_dataset("data/xray", "val")
    model.fit(train, steps_per_epoch=steps, validation_data=val, epochs=10)
    # produced by tf.data service workers (python -m pneumo_data.service):
    train = pneumo_data.read("data/xray", config, service="grpc://dispatcher:5050")

:func:`read` is the entry point every job, the service and the benchmarks use;
:func:`train_dataset` and :func:`eval_dataset` are keyword forms of it.

Training graph with the default memory cache (issue 21), batch by batch::

    per class: shard files -> interleave(TFRecordDataset) -> parse + decode + resize (uint8;
               stage (b) of pneumo_data.preprocess) -> batch(all): ONE uint8 [N_c, H, W, 1]
    classes concatenated (one element, held by flat_map for the iterator's life)
    -> per 16 batches one BalancedSampler draw of row indices -> one gather per batch
    -> optional host augmentation -> prefetch

:class:`pneumo_data.sampler.BalancedSampler` gives the distribution the element-by-element
graph gave (every element picks its class with the target weights; each class walked in a
new permutation every pass), without its per-element work (shuffle-buffer copies,
``sample_from_datasets``' per-element choice, ``batch``'s copies). With a disk cache, no
cache or a tf.data service the per-class graph stays::

    shard files -> interleave -> parse + decode + resize -> cache -> shuffle -> repeat

then ``sample_from_datasets`` over the class streams with the target weights
(balanced by default), batch (drop remainder), optional host augmentation,
prefetch. Images stay uint8 with one channel until the model: 4x fewer bytes
than float32 and 3x fewer than RGB on the way to the accelerator.

``config.residency`` ``device`` (or ``auto`` on a GPU with room) places the whole train split
in device memory instead and returns a :class:`pneumo_data.resident.ResidentTrainSet`, whose
``next_batch()`` a custom train step calls (see :mod:`pneumo_data.resident`); when it does not
fit, the stream, with the reason logged in one line.

An epoch is defined by :func:`steps_per_epoch` (as many images as the train
split holds): the class streams are infinite, so the minority class is never
exhausted mid-epoch and the majority never runs alone.

tf.data options set on purpose:

* ``deterministic``: False by default (parallel stages hand over whatever is
  ready first, faster); True with a seed reproduces the stream exactly.
* ``experimental_distribute.auto_shard_policy = OFF``: with an
  ``InputContext`` the shards are split per worker by file here; auto-sharding
  on top would shard twice.
* Parallel interleave/map, the shuffle buffers and prefetch use AUTOTUNE or sizes
  derived from the data; everything else keeps tf.data's defaults (autotune on,
  map parallelization and fusion optimizations on).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

import tensorflow as tf

from pneumo_data import augment as augment_lib
from pneumo_data import manifest as manifest_lib
from pneumo_data import resident, shard_reader
from pneumo_data.common.errors import UserError
from pneumo_data.config import AUGMENT_MODES, AugmentConfig, PipelineConfig
from pneumo_data.sampler import STEPS_PER_DRAW, BalancedSampler
from pneumo_data.service import check_shards_for_service, service_address
from pneumo_data.shard_reader import parse_class_weights

AUTOTUNE = tf.data.AUTOTUNE
log = logging.getLogger(__name__)
MAX_SHUFFLE_BUFFER = 20_000
MODES = ("train", "eval")
EVAL_SHARDS = ("records", "files")

__all__ = ["read", "train_dataset", "eval_dataset", "steps_per_epoch", "eval_size",
           "eval_shares", "parse_class_weights", "resident_or_stream", "PipelineConfig",
           "AUGMENT_MODES", "MODES"]


def _class_stream(m, label: str, config: PipelineConfig, seed, deterministic: bool,
                  input_context, dynamic: bool = False) -> tf.data.Dataset:
    files = m.shard_paths("train", label)
    if dynamic:
        return _dynamic_class_stream(m, label, files, config, seed, deterministic)
    files, _ = shard_reader.class_files(m, label, input_context)
    count = sum(e["records"] for e in m.shard_entries("train", label))
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=len(files),
                       num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.map(shard_reader.decode_fn(m, config.image_size, False),
                num_parallel_calls=AUTOTUNE,
                deterministic=deterministic)
    cache = shard_reader.as_cache(config.cache)
    if cache == "memory":
        ds = ds.cache()
    elif cache != "none":
        os.makedirs(os.path.dirname(os.path.abspath(cache)) or ".", exist_ok=True)
        ds = ds.cache(f"{cache}-{label}-{config.image_size}")
    ds = ds.shuffle(min(count, MAX_SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True)
    return ds.repeat()


def _dynamic_class_stream(m, label, files, config, seed, deterministic) -> tf.data.Dataset:
    """The class stream for tf.data service dynamic sharding (``ShardingPolicy.DYNAMIC``).

    The file list is the split source: the dispatcher hands its files out one at a
    time, round after round, to whichever worker asks, so the workers read
    disjoint files within a round and each builds its own balanced stream from
    them. Reading is one file at a time (a worker asks for a file only when it
    needs one) and the shuffle buffer holds about two files, so no worker hoards a
    round. The file order is the same every round: a ``shuffle`` of the file list
    is not shared between the workers (each shuffles the splits it sees; measured:
    files repeated within a round), and ``prepare`` already wrote each shard as a
    random sample of its class. No cache: a worker's files change from round to
    round.
    """
    check_shards_for_service(m, labels=(label,))
    entries = m.shard_entries("train", label)
    per_file = max(e["records"] for e in entries)
    buffer = max(1, min(sum(e["records"] for e in entries), 2 * per_file, MAX_SHUFFLE_BUFFER))
    ds = tf.data.Dataset.from_tensor_slices(files).repeat()
    ds = ds.flat_map(tf.data.TFRecordDataset)
    ds = ds.map(shard_reader.decode_fn(m, config.image_size, False),
                num_parallel_calls=AUTOTUNE,
                deterministic=deterministic)
    return ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)


def _sampled_stream(m, config: PipelineConfig, weights, seed, deterministic,
                    input_context) -> tf.data.Dataset:
    """The memory-cached stream, batch by batch (issue 21; see the module docstring).

    The same distribution as the per-class ``cache -> shuffle(N) -> repeat`` streams under
    ``sample_from_datasets``: each element picks its class independently with the target
    weights, each class is walked in a new permutation every pass (a keyed Feistel
    permutation per (seed, class, pass) rather than a uniform draw over all N! orders).
    """
    if seed is None:  # unseeded: a new stream each run, as the shuffle buffers gave
        import random
        seed = random.SystemRandom().randrange(2 ** 31)
    parts, used, counts = [], [], []
    for label, weight in shard_reader.drawn_classes(m, weights):
        ds, count = shard_reader.class_images(m, label, config, deterministic, input_context)
        parts.append(ds)
        used.append(weight)
        counts.append(count)
    batch = config.batch_size
    if input_context is not None:
        batch = input_context.get_per_replica_batch_size(batch)
    sampler = BalancedSampler(counts=counts, weights=used, seed=seed)
    whole = tf.data.Dataset.zip(tuple(parts)).map(
        lambda *xs: (tf.concat([x[0] for x in xs], 0), tf.concat([x[1] for x in xs], 0)))

    def batches(images, labels):
        def draw(state, chunk):
            rows, _, state = sampler.draw(state, chunk, batch, steps=STEPS_PER_DRAW)
            return state, rows
        rows = tf.data.Dataset.counter().scan(sampler.initial_state(), draw)
        rows = rows.flat_map(tf.data.Dataset.from_tensor_slices)
        return rows.map(lambda r: (tf.gather(images, r), tf.gather(labels, r)),
                        num_parallel_calls=AUTOTUNE, deterministic=deterministic)

    # no .cache(): flat_map holds the one element for the iterator's life (a cache would
    # never see its input end and would warn that it discarded itself)
    ds = whole.flat_map(batches)
    if config.augment == "host":
        params = config.augmentation
        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda b, s: (augment_lib.augment_batch(b[0], params, s), b[1]),
            num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return ds.prefetch(AUTOTUNE).with_options(shard_reader.options(deterministic))


def _pipeline_seed(seed: int | None, input_context) -> int | None:
    """Input pipeline ``i`` of several (one per worker) draws from its own seed, so the
    workers' sampling and host augmentation are not copies of one another."""
    if seed is None or input_context is None or input_context.num_input_pipelines <= 1:
        return seed
    return seed + 1_000_003 * input_context.input_pipeline_id


def _content_seed(images: tf.Tensor) -> tf.Tensor:
    """A [2] int64 seed from a batch's pixels: tf.data service workers run the same graph
    with the same seeds but read different files, so mixing this into a seed gives each
    worker its own augmentation draws."""
    sample = tf.cast(tf.reshape(images[:, ::7, ::7], [-1]), tf.int64)
    mixed = tf.reduce_sum(sample * (tf.range(tf.size(sample, tf.int64)) * 2 + 1))
    return tf.stack([mixed % 2_147_483_647, mixed // 2_147_483_647 % 2_147_483_647])


def read(data_dir, config: PipelineConfig | None = None, *, mode: str = "train",
         split: str | None = None, seed: int | None = None, deterministic: bool = False,
         class_weights: str | Mapping[str, float] | None = None,
         input_context: tf.distribute.InputContext | None = None,
         with_metadata: bool = False, shard: str = "records", service: str | None = None,
         job_name: str | None = None, strategy: tf.distribute.Strategy | None = None):
    """The stream of a prepared folder (the one input reader; see the module docstring).

    Args:
      data_dir: a folder written by ``pneumo_data.prepare``.
      config: batch size, image size, class mix, augmentation, cache, checksums
        (default: ``PipelineConfig()``).
      mode: ``train``: the infinite, rebalanced training stream of ``(uint8 [B,H,W,1],
        float32 [B,1])`` (:func:`train_dataset`); ``eval``: every example of ``split``
        exactly once, in a fixed order, unaugmented (:func:`eval_dataset`).
      split: the split to evaluate (``eval`` only; the training stream reads ``train``).
      seed: seeds shuffling, class sampling and host augmentation (``train``).
      deterministic: reproducible order; with a seed, the same stream each run (``train``).
      class_weights: target class mix overriding ``config.class_weights`` (``train``).
      input_context: from ``tf.distribute``; each input pipeline reads its share.
      with_metadata, shard: see :func:`eval_dataset` (``eval``).
      service: ``grpc://host:port`` of a tf.data service dispatcher: the stream is produced
        by its workers (``ShardingPolicy.DYNAMIC``, see :mod:`pneumo_data.service`); the
        cache does not apply and, for ``eval``, ``shard`` is ``files``.
      job_name: ``train`` with a service: trainers passing the same name share one job
        (each element goes to one of them); None: a job of this reader alone.
      strategy: ``train`` with ``config.residency`` ``device``/``auto``: the strategy whose
        replicas' devices hold the set (default: the current one).

    Returns a ``tf.data.Dataset``; with ``config.residency`` ``device`` or ``auto`` (train,
    no service) a :class:`pneumo_data.resident.ResidentTrainSet` when the set is placed,
    else the stream (the reason logged, one line; :func:`resident_or_stream` returns
    it).
    """
    config = config or PipelineConfig()
    if service is not None:  # the workers open the shard files from their own folders
        data_dir = os.path.abspath(data_dir)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "train":
        if split not in (None, "train"):
            raise ValueError(f"the training stream reads the train split, not {split!r}")
        if config.residency != "stream" and service is None:
            return resident_or_stream(
                data_dir, config, seed=seed, deterministic=deterministic,
                class_weights=class_weights, strategy=strategy, input_context=input_context)[0]
        dataset = _train_stream(data_dir, config, seed=seed, deterministic=deterministic,
                                class_weights=class_weights, input_context=input_context,
                                dynamic=service is not None)
    else:
        if split is None:
            raise ValueError("mode='eval' needs the split to read")
        dataset = _eval_stream(data_dir, split, config, with_metadata=with_metadata,
                               input_context=input_context,
                               shard="files" if service is not None else shard)
    if service is None:
        return dataset
    return dataset.apply(tf.data.experimental.service.distribute(
        processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
        service=service_address(service), job_name=job_name if mode == "train" else None))


def _train_stream(data_dir, config: PipelineConfig, *, seed, deterministic, class_weights,
                  input_context, dynamic: bool) -> tf.data.Dataset:
    """The training graph; ``dynamic`` builds it for tf.data service dynamic sharding (see
    :mod:`pneumo_data.service`): each class's files are the split source, no cache, no
    prefetch, and ``input_context`` only sets the per-replica batch."""
    if not dynamic:
        seed = _pipeline_seed(seed, input_context)
    m = shard_reader.open_split(data_dir, "train", config)
    weights = parse_class_weights(class_weights if class_weights is not None
                                  else config.class_weights, m.classes)
    if not dynamic and shard_reader.as_cache(config.cache) == "memory":
        return _sampled_stream(m, config, weights, seed, deterministic, input_context)
    streams, used = [], []
    for label, weight in shard_reader.drawn_classes(m, weights):
        stream_seed = None if seed is None else seed + 1000 * (len(streams) + 1)
        streams.append(_class_stream(m, label, config, stream_seed, deterministic,
                                     input_context, dynamic))
        used.append(weight)
    ds = tf.data.Dataset.sample_from_datasets(
        streams, weights=used, seed=seed, stop_on_empty_dataset=True,
        rerandomize_each_iteration=True) if len(streams) > 1 else streams[0]
    batch = config.batch_size
    if input_context is not None:
        batch = input_context.get_per_replica_batch_size(batch)
    ds = ds.batch(batch, drop_remainder=True, num_parallel_calls=AUTOTUNE,
                  deterministic=deterministic)
    if config.augment == "host":
        params = config.augmentation
        seeds = tf.data.Dataset.random(seed=seed).batch(2)

        def augment(batch, s):
            if dynamic:
                s = s + _content_seed(batch[0])
            return augment_lib.augment_batch(batch[0], params, s), batch[1]
        ds = tf.data.Dataset.zip(ds, seeds).map(augment, num_parallel_calls=AUTOTUNE,
                                                deterministic=deterministic)
    if not dynamic:  # a service worker buffers by itself; a prefetch here made it
        ds = ds.prefetch(AUTOTUNE)  # pull files ahead and images repeat sooner (measured)
    return ds.with_options(shard_reader.options(deterministic))


def _eval_stream(data_dir, split: str, config: PipelineConfig, *, with_metadata: bool,
                 input_context, shard: str) -> tf.data.Dataset:
    m = shard_reader.open_split(data_dir, split, config)
    files = [path for label in m.classes for path in m.shard_paths(split, label)]
    if not files or m.count(split) == 0:
        raise manifest_lib.ManifestError(f"{data_dir}: split {split!r} holds no images")
    if shard not in EVAL_SHARDS:
        raise ValueError(f"shard must be one of {EVAL_SHARDS}, got {shard!r}")
    pipelines = input_context.num_input_pipelines if input_context is not None else 1
    if shard == "files" and pipelines > 1:
        files = files[input_context.input_pipeline_id::pipelines]
    ds = tf.data.TFRecordDataset(tf.constant(files, tf.string, shape=[len(files)]),
                                 num_parallel_reads=None)
    if shard == "records" and pipelines > 1:
        ds = ds.shard(pipelines, input_context.input_pipeline_id)
    ds = ds.map(shard_reader.decode_fn(m, config.image_size, with_metadata),
                num_parallel_calls=AUTOTUNE,
                deterministic=True)
    batch_size = config.batch_size
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    ds = ds.batch(batch_size, drop_remainder=False)
    return ds.prefetch(AUTOTUNE).with_options(shard_reader.options(True))


_DEFAULT = PipelineConfig()


def train_dataset(data_dir, *, batch_size: int = _DEFAULT.batch_size,
                  image_size: int = _DEFAULT.image_size,
                  class_weights: str | Mapping[str, float] | None = None,
                  augment: str = _DEFAULT.augment, cache: bool | str = _DEFAULT.cache,
                  seed: int | None = None, deterministic: bool = False,
                  input_context: tf.distribute.InputContext | None = None,
                  augmentation: AugmentConfig | None = None,
                  verify_checksums: bool = _DEFAULT.verify_checksums,
                  service: str | None = None, job_name: str | None = None,
                  residency: str = _DEFAULT.residency,
                  residency_budget_mb: float = _DEFAULT.residency_budget_mb,
                  strategy: tf.distribute.Strategy | None = None):
    """The infinite, rebalanced training stream of ``(uint8 [B,H,W,1], float32 [B,1])``:
    :func:`read` with ``mode="train"``, its :class:`PipelineConfig` given as keywords.

    Args:
      data_dir: a folder written by ``pneumo_data.prepare``.
      batch_size: global batch size (per replica with an ``input_context``).
      image_size: side of the square images.
      class_weights: target class mix, a mapping or ``'normal=1,pneumonia=2'``;
        None balances the classes.
      augment: ``host`` augments in tf.data; ``device`` and ``none`` leave the
        images as they are (``device``: the model's own augmentation layer
        does it on the accelerator).
      cache: ``memory`` (or True), ``none`` (or False), or a file path prefix for an
        on-disk cache.
      seed: seeds shuffling, class sampling and host augmentation.
      deterministic: reproducible order; with a seed, the same stream each run.
      input_context: from ``tf.distribute``; shards files across input pipelines.
      augmentation: ranges for host augmentation (default: ``AugmentConfig()``, the default
        recipe's; ``AugmentConfig.seed_recipe()`` is the old recipe's).
      verify_checksums: check shard sha256 first (sizes are always checked).
      service, job_name: read through a tf.data service (see :func:`read`).
      residency, residency_budget_mb, strategy: ``device`` or ``auto`` returns a
        :class:`pneumo_data.resident.ResidentTrainSet` when the set fits (see :func:`read`).

    Use :func:`steps_per_epoch` for the epoch length.
    """
    config = PipelineConfig(batch_size=batch_size, image_size=image_size,
                            class_weights=None, augment=augment,
                            cache=shard_reader.as_cache(cache),
                            verify_checksums=verify_checksums, residency=residency,
                            residency_budget_mb=residency_budget_mb,
                            augmentation=augmentation or AugmentConfig())
    return read(data_dir, config, mode="train", seed=seed, deterministic=deterministic,
                class_weights=class_weights, input_context=input_context, service=service,
                job_name=job_name, strategy=strategy)


def resident_or_stream(data_dir, config: PipelineConfig, *, seed: int | None = None,
                       deterministic: bool = False,
                       class_weights: str | Mapping[str, float] | None = None,
                       strategy=None, input_context=None):
    """The train split placed in device memory (:mod:`pneumo_data.resident`):
    ``(ResidentTrainSet, None)``, or ``(the stream, reason)`` when the set is refused (the
    reason also logged, one line). ``input_context`` is only for the stream."""
    try:
        return resident.resident_train_set(data_dir, config, seed=seed, deterministic=deterministic,
                                  class_weights=class_weights, strategy=strategy), None
    except resident.ResidentRefused as refused:
        reason = str(refused)
        log.warning("device-resident training set not placed, streaming instead: %s", reason)
        stream = read(data_dir, _as_stream(config), mode="train", seed=seed,
                      deterministic=deterministic, class_weights=class_weights,
                      input_context=input_context)
        return stream, reason


def _as_stream(config: PipelineConfig) -> PipelineConfig:
    return dataclasses.replace(config, residency="stream")


def eval_dataset(data_dir, split: str, *, batch_size: int = _DEFAULT.batch_size,
                 image_size: int = _DEFAULT.image_size, with_metadata: bool = False,
                 verify_checksums: bool = _DEFAULT.verify_checksums,
                 input_context: tf.distribute.InputContext | None = None,
                 shard: str = "records", service: str | None = None) -> tf.data.Dataset:
    """Every example of ``split`` exactly once, in a fixed order, unaugmented: :func:`read`
    with ``mode="eval"``.

    Yields ``(images uint8 [B,H,W,1], labels float32 [B,1])``, the last batch
    possibly smaller; with ``with_metadata`` a third element, a dict of
    ``patient_id``, ``subtype`` and ``source_path`` string tensors [B].

    With an ``input_context`` (input pipeline ``i`` of ``P``) it yields only that
    pipeline's share and ``batch_size`` is the global batch (each batch holds the
    per-replica share): with ``shard="records"`` the examples ``i, i+P, i+2P, ...``
    of the fixed order; with ``shard="files"`` the records of the shard files
    ``i, i+P, ...`` (for tf.data service dynamic sharding, whose splits are files).
    :func:`eval_shares` gives the share sizes. Through a ``service``, batches arrive in no
    fixed order, each worker's last batch may be short, and each iteration is a job of
    its own.
    """
    config = PipelineConfig(batch_size=batch_size, image_size=image_size,
                            verify_checksums=verify_checksums)
    return read(data_dir, config, mode="eval", split=split, with_metadata=with_metadata,
                input_context=input_context, shard=shard, service=service)


def steps_per_epoch(data_dir, batch_size: int = _DEFAULT.batch_size) -> int:
    """Batches per epoch: as many images as the train split holds (at least 1).

    ``batch_size`` is the global batch (all replicas together).
    """
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    m = manifest_lib.load_manifest(data_dir)
    return max(1, m.count("train") // batch_size)


def eval_shares(data_dir, split: str, pipelines: int, shard: str = "records") -> list[int]:
    """Examples per input pipeline of :func:`eval_dataset` with ``pipelines`` input
    pipelines and ``shard`` (in pipeline order; they add up to :func:`eval_size`)."""
    m = manifest_lib.load_manifest(data_dir)
    total = m.count(split)
    if shard == "records":
        return [len(range(i, total, pipelines)) for i in range(pipelines)]
    counts = [e["records"] for label in m.classes for e in m.shard_entries(split, label)]
    return [sum(counts[i::pipelines]) for i in range(pipelines)]


def eval_size(data_dir, split: str) -> int:
    """Number of examples :func:`eval_dataset` yields for ``split``."""
    return manifest_lib.load_manifest(data_dir).count(split)
