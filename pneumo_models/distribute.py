"""Which devices train, and who writes: the tf.distribute strategy of a run.

::

    from pneumo_models import distribute
    strategy = distribute.make_strategy("auto")      # before any other TensorFlow work
    per_replica = distribute.per_replica_batch_size(32, strategy)
    if distribute.is_chief(strategy): ...            # the only process writing MODEL_DIR

Strategies (``--strategy``):

============= ==============================================================
auto          one device (the first GPU, else the CPU); MirroredStrategy over
              every local GPU when more than one is visible
one_device    OneDeviceStrategy on the first GPU, else the CPU
mirrored      MirroredStrategy over every local GPU (over every logical CPU
              device when there is no GPU: one, unless PNEUMO_CPU_DEVICES)
multi_worker  MultiWorkerMirroredStrategy; the cluster and this process's
              place in it come from the ``TF_CONFIG`` environment variable
tpu           TPUStrategy through TPUClusterResolver (``--tpu``, else
              ``TPU_NAME``, else the local TPU VM)
============= ==============================================================

Rules that hold for every strategy:

* ``--batch_size`` is the global batch: each of the R replicas gets
  ``batch_size / R`` examples per step (an error when R does not divide it), so
  the optimisation is the same on 1 or 8 devices.
* The learning rate is used as given. :func:`scale_learning_rate` offers the
  linear rule (``lr * R``, Goyal et al. 2017) for users who grow
  ``--batch_size`` with the replica count; it is off by default.
* Only the chief writes the run's outputs. The chief decides (complete run,
  resume state) and :func:`broadcast_from_chief` tells the other workers, which
  need nothing of their own on disk.

``PNEUMO_CPU_DEVICES=N`` (for tests and for rehearsing a multi-device run on a
CPU-only machine) splits the CPU into N logical devices before TensorFlow starts
using them, so ``--strategy=mirrored`` runs N replicas on the CPU. The replicas
share the same cores: this shows that a run works, not that it is faster.

``multi_worker`` must be chosen before TensorFlow runs anything else in the
process (it configures the collective runtime); :func:`make_strategy` says so
when that is not the case.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from pneumo_data.common.errors import UserError
from pneumo_models.config import LR_SCALING, STRATEGIES

log = logging.getLogger("pneumo.distribute")

WORKER_TASK_TYPES = ("chief", "worker")
CPU_DEVICES_ENV = "PNEUMO_CPU_DEVICES"
_CHUNK = 1 << 24  # int32 elements per collective when broadcasting bytes (64 MB)


class DistributeError(UserError):
    """A strategy cannot be built here, or its inputs are inconsistent; the message says why."""


# ---------------------------------------------------------------- TF_CONFIG

@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """The parsed, checked ``TF_CONFIG`` of one multi-worker process."""

    cluster: dict[str, list[str]]
    task_type: str
    task_index: int

    @property
    def num_workers(self) -> int:
        return sum(len(self.cluster.get(t, [])) for t in WORKER_TASK_TYPES)

    @property
    def is_chief(self) -> bool:
        if "chief" in self.cluster:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def task(self) -> str:
        return f"{self.task_type}-{self.task_index}"

    @property
    def address(self) -> str:
        return self.cluster[self.task_type][self.task_index]


_TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                      '"task": {"type": "worker", "index": 0}}\'')


def parse_tf_config(text: str | None) -> ClusterInfo:
    """Checks a ``TF_CONFIG`` value and returns what it says.

    Raises DistributeError for a missing or malformed value, task types other
    than chief/worker, an index outside its list, or an address without a port.
    """
    if not text or not text.strip():
        raise DistributeError(
            f"--strategy=multi_worker needs the TF_CONFIG environment variable (the cluster and "
            f"this process's task), e.g. {_TF_CONFIG_EXAMPLE}; start one process per worker, "
            f"each with its own task index")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise DistributeError(f"TF_CONFIG is not valid JSON ({error}): {text!r}") from None
    if not isinstance(config, dict):
        raise DistributeError(f"TF_CONFIG must be a JSON object, got {text!r}")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise DistributeError(f"TF_CONFIG has no 'cluster' object: {text!r}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise DistributeError(f"TF_CONFIG needs 'task': {{'type': ..., 'index': ...}}: {text!r}")
    unsupported = sorted(set(cluster) - set(WORKER_TASK_TYPES))
    if unsupported:
        raise DistributeError(
            f"TF_CONFIG cluster has task type(s) {unsupported}; MultiWorkerMirroredStrategy "
            f"here uses only {list(WORKER_TASK_TYPES)} (no parameter servers or evaluator)")
    clean: dict[str, list[str]] = {}
    for task_type, addresses in cluster.items():
        if isinstance(addresses, str):
            addresses = [addresses]
        if not isinstance(addresses, list) or not addresses:
            raise DistributeError(f"TF_CONFIG cluster[{task_type!r}] must be a non-empty list "
                                  f"of 'host:port', got {addresses!r}")
        for address in addresses:
            host, sep, port = str(address).rpartition(":")
            if not sep or not host or not port.isdigit():
                raise DistributeError(f"TF_CONFIG address {address!r} is not 'host:port'")
        clean[task_type] = [str(a) for a in addresses]
    if len(clean.get("chief", [])) > 1:
        raise DistributeError("TF_CONFIG may name at most one chief")
    task_type, index = task["type"], task["index"]
    if task_type not in clean:
        raise DistributeError(f"TF_CONFIG task type {task_type!r} is not in the cluster "
                              f"({sorted(clean)})")
    if not isinstance(index, int) or isinstance(index, bool) or not \
            0 <= index < len(clean[task_type]):
        raise DistributeError(f"TF_CONFIG task index {index!r} is outside cluster[{task_type!r}] "
                              f"(0..{len(clean[task_type]) - 1})")
    return ClusterInfo(clean, task_type, index)


def cluster_info(env: Mapping[str, str] | None = None) -> ClusterInfo:
    """:func:`parse_tf_config` of this process's ``TF_CONFIG``."""
    return parse_tf_config((os.environ if env is None else env).get("TF_CONFIG"))


def role(strategy_name: str, env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """(is chief, task name) of this process for ``--strategy=strategy_name``, known without
    TensorFlow: ``(True, "chief-0")`` outside a multi-worker cluster."""
    if strategy_name != "multi_worker":
        return True, "chief-0"
    info = cluster_info(env)
    return info.is_chief, info.task


def scratch_dir(model_dir: str | os.PathLike, task: str) -> Path:
    """A non-chief worker's scratch folder: outside the user's model_dir, in the temporary
    folder (``TMPDIR``), named after the run's model_dir and the task, so a restarted
    worker finds (and clears) its own earlier scratch instead of leaving it behind."""
    digest = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"pneumo-train-{digest}-{task}"


# ---------------------------------------------------------------- strategies

def configure_cpu_devices(env: Mapping[str, str] | None = None) -> int | None:
    """Splits the CPU into ``PNEUMO_CPU_DEVICES`` logical devices (tests, CPU-only rehearsal);
    returns the count, or None when the variable is unset. Must run before TensorFlow
    initialises its devices."""
    value = (os.environ if env is None else env).get(CPU_DEVICES_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise DistributeError(f"{CPU_DEVICES_ENV} must be a positive integer, got {value!r}")
    import tensorflow as tf
    count = int(value)
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return count
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        raise DistributeError(
            f"{CPU_DEVICES_ENV}={count}: TensorFlow's devices were already initialised in this "
            f"process; set the variable before the process starts") from None
    return count


def make_strategy(name: str = "auto", *, tpu: str | None = None, devices=None):
    """Builds the ``tf.distribute.Strategy`` called ``name`` (one of STRATEGIES).

    Args:
      name: see the module docstring.
      tpu: TPU name or address for ``tpu`` (default: ``TPU_NAME``, else ``local``).
      devices: device names for ``mirrored`` (default: every GPU, else every
        logical CPU device).
    """
    if name not in STRATEGIES:
        raise DistributeError(f"--strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "multi_worker":
        info = cluster_info()  # a clear error before TensorFlow is touched
        configure_cpu_devices()
        return _multi_worker(info)
    if name == "tpu":
        return _tpu(tpu)
    configure_cpu_devices()
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto" and os.environ.get("TF_CONFIG"):
        log.info("TF_CONFIG is set but --strategy=auto trains on this machine only; "
                 "use --strategy=multi_worker to join the cluster")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        if devices is None:
            devices = [d.name for d in gpus] or [
                d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=list(devices))
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def _multi_worker(info: ClusterInfo):
    import tensorflow as tf
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except (RuntimeError, ValueError) as error:
        raise DistributeError(
            f"could not start MultiWorkerMirroredStrategy as {info.task} of "
            f"{info.num_workers} ({error}). Build the strategy first thing in the process, "
            f"before any other TensorFlow operation.") from None
    log.info("multi_worker: %s of %d workers (%s), %d replicas", info.task, info.num_workers,
             info.address, strategy.num_replicas_in_sync)
    return strategy


def _tpu(address: str | None):
    import tensorflow as tf
    address = address or os.environ.get("TPU_NAME") or "local"
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        if address != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except (ValueError, RuntimeError, OSError, tf.errors.OpError) as error:
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise DistributeError(
            f"--strategy=tpu: no usable TPU at {address!r} ({type(error).__name__}: "
            f"{first_line}). Run on a TPU VM (or set TPU_NAME / pass --tpu), or choose "
            f"--strategy=auto") from None


# ---------------------------------------------------------------- roles

def is_multi_worker(strategy) -> bool:
    import tensorflow as tf
    return isinstance(strategy, (tf.distribute.MultiWorkerMirroredStrategy,
                                 tf.distribute.experimental.MultiWorkerMirroredStrategy))


def is_tpu(strategy) -> bool:
    import tensorflow as tf
    return isinstance(strategy, (tf.distribute.TPUStrategy,
                                 tf.distribute.experimental.TPUStrategy))


def task(strategy) -> tuple[str, int]:
    """(task type, index) of this process: ``("chief", 0)`` outside a multi-worker cluster."""
    if is_multi_worker(strategy):
        resolver = strategy.cluster_resolver
        return resolver.task_type or "worker", int(resolver.task_id or 0)
    return "chief", 0


def is_chief(strategy=None) -> bool:
    """True in the process that writes the run's outputs (the only one, outside a cluster)."""
    if strategy is None or not is_multi_worker(strategy):
        return True
    task_type, index = task(strategy)
    if task_type == "chief":
        return True
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and index == 0 and "chief" not in cluster


def num_workers(strategy) -> int:
    if is_multi_worker(strategy):
        cluster = strategy.cluster_resolver.cluster_spec().as_dict()
        return sum(len(cluster.get(t, [])) for t in WORKER_TASK_TYPES)
    return 1


def task_names(strategy) -> list[str]:
    """The workers' task names in rank order (chief first), e.g. ``["worker-0", "worker-1"]``."""
    if not is_multi_worker(strategy):
        return ["chief-0"]
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return [f"{t}-{i}" for t in WORKER_TASK_TYPES for i in range(len(cluster.get(t, [])))]


def is_peer_failure(error: BaseException) -> bool:
    """True for the errors a collective raises when another worker of the cluster died or
    became unreachable (TensorFlow aborts the pending collectives)."""
    import tensorflow as tf
    return isinstance(error, (tf.errors.UnavailableError, tf.errors.AbortedError,
                              tf.errors.CancelledError, tf.errors.DeadlineExceededError))


def describe(strategy) -> dict[str, Any]:
    """What run.json records about the strategy."""
    task_type, index = task(strategy)
    devices = list(getattr(strategy.extended, "worker_devices", ()) or ())
    name = "MultiWorkerMirroredStrategy" if is_multi_worker(strategy) else \
        type(strategy).__name__  # (TensorFlow's own class is CollectiveAllReduceStrategy)
    return {"strategy": name, "replicas": strategy.num_replicas_in_sync,
            "workers": num_workers(strategy), "task": f"{task_type}-{index}",
            "devices": [str(d) for d in devices]}


# ---------------------------------------------------------------- batch and learning rate

def per_replica_batch_size(global_batch_size: int, strategy_or_replicas) -> int:
    """``global_batch_size / replicas``; DistributeError when it does not divide evenly."""
    replicas = _replicas(strategy_or_replicas)
    if global_batch_size <= 0:
        raise DistributeError(f"--batch_size must be positive, got {global_batch_size}")
    if global_batch_size % replicas:
        lower = global_batch_size // replicas * replicas
        options = " or ".join(str(b) for b in (lower, lower + replicas) if b > 0)
        raise DistributeError(
            f"--batch_size={global_batch_size} is the global batch and must be divisible by the "
            f"{replicas} replicas (try {options})")
    return global_batch_size // replicas


def scale_learning_rate(learning_rate: float, strategy_or_replicas, rule: str = "none") -> float:
    """The learning rate under ``rule``: ``none`` keeps it; ``linear`` multiplies it by the
    number of replicas (use it when ``--batch_size`` grows with the replicas, i.e. the
    per-replica batch stays fixed; large factors usually also want a warm-up)."""
    if rule not in LR_SCALING:
        raise DistributeError(f"--lr_scaling must be one of {LR_SCALING}, got {rule!r}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise DistributeError(f"learning rate must be a positive number, got {learning_rate}")
    if rule == "none":
        return learning_rate
    return learning_rate * _replicas(strategy_or_replicas)


def _replicas(strategy_or_replicas) -> int:
    if isinstance(strategy_or_replicas, int):
        replicas = strategy_or_replicas
    else:
        replicas = strategy_or_replicas.num_replicas_in_sync
    if replicas <= 0:
        raise DistributeError(f"replica count must be positive, got {replicas}")
    return replicas


# ---------------------------------------------------------------- collectives

def _all_reduce(strategy, array, *, chief_only: bool = False):
    """The sum over workers of ``array`` (numpy int32/int64/float), each worker counted once
    (only its first local replica contributes), or the chief's alone with ``chief_only``.
    Every worker must call it at the same point."""
    import numpy as np
    import tensorflow as tf
    local = tf.constant(np.asarray(array))
    per_worker = len(strategy.extended.worker_devices)

    def replica_fn():
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        mine = tf.equal(rid, 0) if chief_only else tf.equal(rid % per_worker, 0)
        return tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.where(mine, local, tf.zeros_like(local)))

    return strategy.experimental_local_results(strategy.run(replica_fn))[0].numpy()


def gather_over_workers(strategy, array):
    """``[workers, *array.shape]``: every worker's ``array``, chief first (collective)."""
    import numpy as np
    import tensorflow as tf
    array = np.asarray(array)
    if not is_multi_worker(strategy):
        return array[None]
    workers = num_workers(strategy)
    per_worker = len(strategy.extended.worker_devices)
    local = tf.constant(array)

    def replica_fn():
        ctx = tf.distribute.get_replica_context()
        rid = ctx.replica_id_in_sync_group
        row = tf.reshape(tf.one_hot(rid // per_worker, workers, dtype=local.dtype),
                         [workers] + [1] * array.ndim)
        value = tf.where(tf.equal(rid % per_worker, 0), row * local[None],
                         tf.zeros([workers, *array.shape], local.dtype))
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)

    return strategy.experimental_local_results(strategy.run(replica_fn))[0].numpy()


def broadcast_from_chief(strategy, data: bytes | None) -> bytes:
    """The chief's ``data`` on every worker (``data`` is ignored elsewhere).

    Outside a multi-worker cluster it returns ``data``. Every worker must call it at the
    same point (it runs collectives).
    """
    if not is_multi_worker(strategy):
        return data or b""
    import numpy as np
    mine = (data or b"") if is_chief(strategy) else b""
    size = int(_all_reduce(strategy, np.array([len(mine)], np.int64), chief_only=True)[0])
    words = np.frombuffer(mine + b"\0" * (-len(mine) % 4), np.int32) if mine else \
        np.zeros(-(-size // 4), np.int32)
    parts = [_all_reduce(strategy, words[i:i + _CHUNK], chief_only=True)
             for i in range(0, len(words), _CHUNK)]
    return b"".join(p.astype(np.int32).tobytes() for p in parts)[:size]


def broadcast_json(strategy, value: Any) -> Any:
    """The chief's JSON-serialisable ``value`` on every worker."""
    data = json.dumps(value).encode() if is_chief(strategy) else None
    return json.loads(broadcast_from_chief(strategy, data).decode())


def replica_divergence(strategy, variables) -> float:
    """The largest difference between two replicas' copies of ``variables`` (0.0 when every
    replica holds the same weights). This worker's copies are compared element by element;
    between workers, each worker's checksums (per variable, the float64 sum and sum of
    squares of its first copy) are compared, relative to their size. Collective under a
    cluster."""
    import numpy as np
    worst = 0.0
    sums = []
    for variable in variables:
        value = getattr(variable, "value", variable)  # a Keras variable's tf.Variable
        value = variable if callable(value) else value
        copies = [np.asarray(c, np.float64) for c in strategy.experimental_local_results(value)]
        for other in copies[1:]:
            worst = max(worst, float(np.max(np.abs(other - copies[0]), initial=0.0)))
        sums += [copies[0].sum(), (copies[0] * copies[0]).sum()]
    if is_multi_worker(strategy) and sums:
        every = gather_over_workers(strategy, np.asarray(sums, np.float64))
        scale = np.maximum(np.abs(every[0]), 1.0)
        worst = max(worst, float(np.max(np.abs(every - every[0]) / scale)))
    return worst
