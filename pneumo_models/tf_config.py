"""This process's place in a multi-worker cluster, from ``TF_CONFIG`` (no TensorFlow here).

``--strategy=multi_worker`` reads the cluster and this process's task from the ``TF_CONFIG``
environment variable. The training job checks it (:func:`role`) before TensorFlow loads, so a
malformed value is a one-line error; a non-chief worker writes into :func:`scratch_dir`, never
into the user's model_dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

from pneumo_data.common.errors import UserError

WORKER_TASK_TYPES = ("chief", "worker")


class DistributeError(UserError):
    """A strategy cannot be built here, or its inputs are inconsistent; the message says why."""



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

