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
  resume state) and :func:`pneumo_models.cluster.broadcast_from_chief` tells the other
  workers, which need nothing of their own on disk.

``PNEUMO_CPU_DEVICES=N`` (for tests and for rehearsing a multi-device run on a
CPU-only machine) splits the CPU into N logical devices before TensorFlow starts
using them, so ``--strategy=mirrored`` runs N replicas on the CPU. The replicas
share the same cores: this shows that a run works, not that it is faster.

``multi_worker`` must be chosen before TensorFlow runs anything else in the
process (it configures the collective runtime); :func:`make_strategy` says so
when that is not the case. TF_CONFIG parsing lives in :mod:`pneumo_models.tf_config` (no
TensorFlow), collectives in :mod:`pneumo_models.cluster`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping

import tensorflow as tf

from pneumo_models.config import LR_SCALING, STRATEGIES
from pneumo_models.tf_config import (
    WORKER_TASK_TYPES,
    ClusterInfo,
    DistributeError,
    cluster_info,
)

log = logging.getLogger("pneumo.distribute")

CPU_DEVICES_ENV = "PNEUMO_CPU_DEVICES"


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
    return isinstance(strategy, (tf.distribute.MultiWorkerMirroredStrategy,
                                 tf.distribute.experimental.MultiWorkerMirroredStrategy))


def is_tpu(strategy) -> bool:
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


