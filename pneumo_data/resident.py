"""The device-resident training set (issue 21): the train split placed once in device memory.

The train split's uint8 images and labels are read once (the reader's own decode), checked
against the memory they need, and placed as constant tensors on every replica's device. Each step
then draws a class-balanced batch of rows there (:class:`pneumo_data.sampler.
BalancedSampler`: the same balance and epoch accounting as the memory-cached stream), gathers
it and, with ``augment="host"``, augments it: nothing per step crosses from the host.

::

    from pneumo_data import resident
    config = PipelineConfig(batch_size=32, residency="device")
    source, reason = reader.resident_or_stream(data_dir, config, seed=0, strategy=strategy)
    if reason:                      # refused: ``source`` is the ordinary stream
        ...
    else:                           # ``source`` is a ResidentTrainSet
        @tf.function
        def train_step():
            def step():
                images, labels = source.next_batch()   # on this replica's device
                ...                                    # forward, loss, gradients
            strategy.run(step)

The training job does this with ``--residency=device`` (:class:`pneumo_models.loop.
TrainingLoop` takes the set in place of a dataset function).

Under ``MirroredStrategy`` every replica holds a copy of the set, computes the same global
draw (same seed, same state) and takes its own slice of it: the replicas' batches are
disjoint and the epoch accounting is that of one device with the global batch. The per-class
counters and the step number are variables; :meth:`ResidentTrainSet.checkpoint_state` and
:meth:`ResidentTrainSet.restore` carry them through a resume (the images are read again from
the data_dir).

``residency="auto"`` places the set only where that is shown to be safe: on GPUs that report
(nvidia-smi) at least twice the free memory it needs, or within an explicit per-device budget;
on a CPU-only machine or a TPU it keeps the stream.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

import numpy as np
import tensorflow as tf

from pneumo_data import augment as augment_lib
from pneumo_data import manifest as manifest_lib
from pneumo_data import shard_reader
from pneumo_data.config import PipelineConfig
from pneumo_data.sampler import STEPS_PER_DRAW, BalancedSampler

log = logging.getLogger(__name__)

HEADROOM = 0.5  # use at most this share of the free memory a device reports
STEP_BYTES_PER_IMAGE = 4 * 6  # float32 copies an augmented image makes in one step (rough)


class ResidentRefused(Exception):
    """The set is not placed; ``str()`` is the one-line reason."""


def required_bytes(data_dir, config: PipelineConfig, class_weights=None) -> int:
    """Bytes one device holds: the uint8 images and float32 labels of the classes drawn, and
    a step's working set (a few float32 copies of one batch)."""
    m = manifest_lib.load_manifest(data_dir)
    weights = shard_reader.parse_class_weights(
        class_weights if class_weights is not None else config.class_weights, m.classes)
    n = sum(m.count("train", c) for c, w in zip(m.classes, weights) if w > 0)
    side = config.image_size
    return n * (side * side + 4) + config.batch_size * side * side * STEP_BYTES_PER_IMAGE


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gpu_free(index: int) -> int | None:
    """Free bytes of GPU ``index`` from nvidia-smi (None when it cannot tell)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free",
                              "--format=csv,noheader,nounits", "-i", str(index)],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(float(out.strip().splitlines()[0])) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def memory_check(nbytes: int, devices: list[str], budget_bytes: int | None = None,
                 host_available=_host_available, gpu_free=_gpu_free) -> str | None:
    """None when ``nbytes`` fit on every device in ``devices`` (and the host can hold one
    copy while placing it), else the one-line reason. ``budget_bytes`` is a per-device
    limit the user gives instead of what the devices report (memory TensorFlow has already
    reserved is not "free" to nvidia-smi, so a budget is the way in then)."""
    mb = nbytes / 2 ** 20
    host = host_available()
    if host is not None and nbytes > HEADROOM * host:
        return (f"the set needs {mb:,.0f} MB of host memory to load and the host has "
                f"{host / 2 ** 20:,.0f} MB available (at most {HEADROOM:.0%} is used)")
    for name in devices:
        spec = tf.DeviceSpec.from_string(name)
        if budget_bytes:
            if nbytes > budget_bytes:
                return (f"the set needs {mb:,.0f} MB on {name} and the given budget is "
                        f"{budget_bytes / 2 ** 20:,.0f} MB")
            continue
        if (spec.device_type or "CPU").upper() == "GPU":
            free, what = gpu_free(spec.device_index or 0), "free (nvidia-smi)"
            if free is None:
                return (f"cannot tell the free memory of {name} (no nvidia-smi answer); "
                        f"give a per-device budget to place {mb:,.0f} MB")
        else:
            free, what = host, "available host memory"
            if free is None:
                return "cannot read the host's available memory (/proc/meminfo)"
        if nbytes > HEADROOM * free:
            return (f"the set needs {mb:,.0f} MB on {name} and {what} is "
                    f"{free / 2 ** 20:,.0f} MB (at most {HEADROOM:.0%} is used)")
    return None


def devices_of(strategy) -> list[str]:
    """The devices whose memory the set would occupy (every replica's)."""
    try:
        workers = strategy.extended.worker_devices
    except (AttributeError, RuntimeError):  # the default strategy has no device list
        workers = None
    if workers:
        return list(workers)
    gpus = tf.config.list_logical_devices("GPU")
    return [gpus[0].name if gpus else "/cpu:0"]


def auto_refusal(devices: list[str], budget_bytes: int | None) -> str | None:
    """Why ``residency="auto"`` keeps the stream on ``devices`` (None: it may place the set,
    subject to :func:`memory_check`): only GPUs are known to gain and to report free memory."""
    kinds = {(tf.DeviceSpec.from_string(d).device_type or "CPU").upper() for d in devices}
    if kinds != {"GPU"}:
        return (f"residency=auto keeps the stream on {'/'.join(sorted(kinds))} devices (device "
                f"residency is automatic on GPUs only; pass residency=device to force it)")
    return None


def _read(data_dir, config: PipelineConfig, weights):
    """All images [N, H, W, 1] uint8 and labels [N, 1] of the drawn classes, class by class,
    and the per-class counts: the reader's own reading and decoding, in the fixed order (a
    row number must name the same image in a resumed run, whatever ``deterministic`` says:
    the order costs nothing here, it is read once)."""
    m = shard_reader.open_split(data_dir, "train", config)
    images, labels, counts, used = [], [], [], []
    for label, weight in shard_reader.drawn_classes(m, weights):
        ds, count = shard_reader.class_images(m, label, config, deterministic=True)
        x, y = ds.with_options(shard_reader.options(True)).get_single_element()
        images.append(x.numpy())
        labels.append(y.numpy())
        counts.append(count)
        used.append(weight)
    return np.concatenate(images), np.concatenate(labels), counts, used


class ResidentTrainSet:
    """The train split in device memory and a class-balanced draw per step.

    Build it with :func:`resident_train_set` or :func:`pneumo_data.reader.
    resident_or_stream` (which check memory first). ``next_batch()`` gives this replica's
    ``(uint8 [b, H, W, 1], float32 [b, 1])``, ``b`` the global batch over the replicas;
    call it inside the (compiled) train step, in replica context under a strategy. With
    ``augmentation`` (config ``augment="host"``: "augment with the data") the batch is
    augmented there too (:func:`pneumo_data.augment.augment_batch`, seeded by (seed, step,
    replica)); otherwise the model's own layer does it.
    """

    def __init__(self, images, labels, sampler: BalancedSampler, batch_size: int,
                 strategy=None, augmentation=None):
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = self.strategy.num_replicas_in_sync
        if batch_size % self.replicas:
            raise ValueError(f"batch_size {batch_size} is not a multiple of the "
                             f"{self.replicas} replicas")
        self.batch_size = batch_size
        self.per_replica = batch_size // self.replicas
        self.sampler = sampler
        self.augmentation = augmentation
        self.count = int(images.shape[0])
        self.image_shape = tuple(int(d) for d in images.shape[1:])
        # The counters are per replica (ON_READ: each replica updates its own copy, no
        # cross-replica call in the step); every replica makes the same update, and reading
        # them outside the step gives the first replica's.
        local = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # Every replica's device holds a copy, as a constant tensor placed there once (not a
        # variable: a gather from a resource variable was 2.3x slower than from a tensor on
        # the 2-vCPU EPYC, and the set is never written).
        self._images, self._labels = [], []
        for device in devices_of(self.strategy)[:self.replicas]:
            with tf.device(device):
                self._images.append(tf.identity(tf.constant(images)))
                self._labels.append(tf.identity(tf.constant(labels)))
        with self.strategy.scope():
            self.state = tf.Variable(sampler.initial_state(), name="resident_state", **local)
            # the per-class counters when the current chunk was drawn (what a resume redraws
            # the chunk from)
            self.chunk_state = tf.Variable(sampler.initial_state(),
                                           name="resident_chunk_state", **local)
            self.step = tf.Variable(tf.constant(0, tf.int64), name="resident_step", **local)
            # the rows of the next STEPS_PER_DRAW steps, drawn together (refilled when the
            # step count reaches a multiple)
            self.rows = tf.Variable(tf.zeros([STEPS_PER_DRAW, batch_size], tf.int64),
                                    name="resident_rows", **local)

    @property
    def images(self) -> tf.Tensor:
        """The first replica's copy of the images [N, H, W, 1] uint8."""
        return self._images[0]

    @property
    def labels(self) -> tf.Tensor:
        """The first replica's copy of the labels [N, 1] float32."""
        return self._labels[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the images and labels on one device."""
        return self.count * (int(np.prod(self.image_shape)) + 4)

    @tf.function(jit_compile=True)
    def _refill(self):
        # One compiled cluster for the draw (some sixty small ops, whose dispatch would cost
        # more than the gather) every STEPS_PER_DRAW steps.
        chunk = self.step // STEPS_PER_DRAW
        self.chunk_state.assign(self.state)
        rows, _, state = self.sampler.draw(self.state, chunk, self.batch_size,
                                           steps=STEPS_PER_DRAW)
        self.rows.assign(rows)
        self.state.assign(state)
        return tf.constant(0, tf.int64)

    def _draw(self, replica):
        refilled = tf.cond(tf.equal(self.step % STEPS_PER_DRAW, 0), self._refill,
                           lambda: tf.constant(0, tf.int64))
        with tf.control_dependencies([refilled]):
            rows = self.rows[self.step % STEPS_PER_DRAW]
        mine = tf.slice(rows, [replica * self.per_replica], [self.per_replica])
        images = tf.gather(self._images[replica], mine)
        labels = tf.gather(self._labels[replica], mine)
        with tf.control_dependencies([images, labels]):
            step = self.step.assign_add(1)
        with tf.control_dependencies([step]):
            return tf.identity(images), tf.identity(labels)

    def next_batch(self):
        """This replica's share of the step's global batch (see the class docstring)."""
        replica = _replica_id()
        images, labels = self._draw(replica)
        if self.augmentation is not None and not self.augmentation.is_identity:
            seed = tf.random.experimental.stateless_fold_in(
                tf.stack([tf.constant(self.sampler.seed or 0, tf.int64), self.step]),
                tf.cast(replica, tf.int64))
            images = augment_lib.augment_batch(images, self.augmentation, seed)
        return images, labels

    def checkpoint_state(self) -> dict:
        """Where the walk is, as JSON-ready numbers: the steps drawn and the per-class
        counters at the start of the current chunk of draws (:meth:`restore` takes it)."""
        return {"step": int(self.step.numpy()),
                "chunk_state": [int(v) for v in self.chunk_state.numpy()],
                "seed": self.sampler.seed, "counts": [int(c) for c in self.sampler.counts]}

    def restore(self, saved: dict) -> None:
        """Continues the walk :meth:`checkpoint_state` recorded: the next batch is the one the
        saved run would have drawn next (the current chunk is drawn again, identically)."""
        if saved.get("seed") != self.sampler.seed or \
                list(saved.get("counts", [])) != [int(c) for c in self.sampler.counts]:
            raise ValueError(f"the saved resident-set state is of another set or seed "
                             f"({saved.get('seed')}, {saved.get('counts')}); expected "
                             f"{self.sampler.seed}, {list(self.sampler.counts)}")
        step = int(saved["step"])
        self.state.assign(tf.constant(saved["chunk_state"], tf.int64))
        self.chunk_state.assign(tf.constant(saved["chunk_state"], tf.int64))
        self.step.assign(step - step % STEPS_PER_DRAW)
        if step % STEPS_PER_DRAW:
            # draw the chunk again and step to where the run was, on every replica, through
            # the same path as training (the draw's XLA numbers are not the kernels')
            @tf.function
            def advance():
                def replica():
                    self._draw(_replica_id())
                for _ in tf.range(step % STEPS_PER_DRAW):
                    self.strategy.run(replica)
            advance()
            self.step.assign(step)


def _replica_id() -> int:
    """This replica's number, known when the step is traced (each replica traces its own)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    if replica is None:
        raise ValueError("the resident set needs a strategy whose replica number is known "
                         "when the step is traced (MirroredStrategy, OneDevice, default)")
    return int(replica)


def resident_train_set(data_dir, config: PipelineConfig, *, seed: int | None = None,
                       deterministic: bool = False, class_weights=None, strategy=None
                       ) -> ResidentTrainSet:
    """The :class:`ResidentTrainSet` of ``data_dir``'s train split, or
    :class:`ResidentRefused` with the reason (before anything is read or placed). Its draws
    are the same for the same seed whatever ``deterministic`` says (kept for the signature
    the stream shares).
    ``config.residency`` ``auto`` refuses off GPUs (:func:`auto_refusal`)."""
    config.validate()
    strategy = strategy or tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise ResidentRefused("several workers: each would hold the whole set and draw the "
                              "same batches; use the stream")
    if config.cache != "memory" and config.residency == "auto":
        raise ResidentRefused(f"residency=auto keeps the stream with cache={config.cache!r} "
                              f"(a set that is not cached in memory is not placed "
                              f"automatically)")
    devices = devices_of(strategy)
    budget = int(config.residency_budget_mb * 2 ** 20) or None
    if config.residency == "auto":
        reason = auto_refusal(devices, budget)
        if reason:
            raise ResidentRefused(reason)
    nbytes = required_bytes(data_dir, config, class_weights)
    reason = memory_check(nbytes, devices, budget)
    if reason:
        raise ResidentRefused(reason)
    m = manifest_lib.load_manifest(data_dir)
    weights = shard_reader.parse_class_weights(
        class_weights if class_weights is not None else config.class_weights, m.classes)
    images, labels, counts, used = _read(data_dir, config, weights)
    if seed is None:
        import random
        seed = random.SystemRandom().randrange(2 ** 31)
    sampler = BalancedSampler(counts=counts, weights=used, seed=seed)
    augmentation = config.augmentation if config.augment == "host" else None
    return ResidentTrainSet(images, labels, sampler, config.batch_size, strategy,
                            augmentation)


__all__ = ["ResidentTrainSet", "ResidentRefused", "resident_train_set",
           "required_bytes", "memory_check", "auto_refusal", "devices_of"]
