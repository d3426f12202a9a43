"""Agreeing across the workers of a cluster: collectives, the chief's decisions and run state.

Under ``--strategy=multi_worker`` every worker runs the training job; only the chief writes the
model_dir. What the chief decides (the run is complete, another run's config, its resume state
and best checkpoint) reaches the others through collectives here, so a worker needs nothing on
disk to resume and no worker returns or fails alone (one that skipped a collective would leave
the rest waiting forever). Every worker must call each function at the same point. Outside a
multi-worker cluster they cost nothing and return the local value.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from typing import Any

import numpy as np
import tensorflow as tf

from pneumo_data.common.errors import UserError
from pneumo_data.common.outputs import RESERVED
from pneumo_models import rundir
from pneumo_models.distribute import is_chief, is_multi_worker, num_workers, task_names

log = logging.getLogger("pneumo.train")

_CHUNK = 1 << 24  # int32 elements per collective when broadcasting bytes (64 MB)


def _all_reduce(strategy, array, *, chief_only: bool = False):
    """The sum over workers of ``array`` (numpy int32/int64/float), each worker counted once
    (only its first local replica contributes), or the chief's alone with ``chief_only``.
    Every worker must call it at the same point."""
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


# ---------------------------------------------------------------- the training job's decisions

class ClusterError(UserError):
    """A worker of the cluster failed, or sent something unexpected; the message says which."""


def agree(strategy, task: str, complete: bool, error: Exception | None) -> tuple[bool, int]:
    """Every worker learns the chief's decision (run complete?) and a run id drawn by the
    chief, and stops when any worker failed before training (a worker that returned or
    raised alone would leave the others waiting in a collective forever). Raises this
    worker's own error, or a ClusterError naming the failed workers."""
    run_id = int.from_bytes(os.urandom(6), "big")
    mine = np.array([int(complete), int(error is not None), run_id], np.int64)
    every = gather_over_workers(strategy, mine)
    if error is not None:
        raise error
    failed = [name for name, row in zip(task_names(strategy), every) if row[1]]
    if failed:
        raise ClusterError(f"{', '.join(failed)} stopped with an error before training (see "
                           f"its log); {task} stops too")
    return bool(every[0][0]), int(every[0][2])


def share_run_state(strategy, out) -> None:
    """Copies the chief's run state (:meth:`pneumo_models.rundir.RunDir.run_state_files`)
    into every other worker's scratch folder ``out`` (an OutputDir)."""
    if not is_multi_worker(strategy):
        return
    data = None
    if is_chief(strategy):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name in rundir.RunDir(out.path).run_state_files():
                tar.add(out.path / name, arcname=name)
        data = buffer.getvalue()
    data = broadcast_from_chief(strategy, data)
    if is_chief(strategy):
        return
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            if not rundir.is_run_state(member.name) or not member.isfile():
                raise ClusterError(f"unexpected file {member.name!r} in the chief's run state")
            if "/" in member.name:
                out.subdir(member.name.split("/")[0])
            with out.replacing(member.name) as tmp:
                tmp.write_bytes(tar.extractfile(member).read())


def remove_scratch(out) -> None:
    """Deletes a worker's scratch folder (an open OutputDir): what its ledger lists, then the
    folder when nothing else is left in it; closes it."""
    try:
        out.clear()
    except UserError as error:
        log.warning("kept the scratch folder %s: %s", out.path, error)
        out.close()
        return
    out.close()
    if out.path.is_dir() and set(os.listdir(out.path)) <= RESERVED:
        for name in os.listdir(out.path):
            (out.path / name).unlink()
        out.path.rmdir()
