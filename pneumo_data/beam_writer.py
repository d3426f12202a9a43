r"""prepare's writing step as an Apache Beam pipeline (``prepare --runner=beam``).

::

    python -m pneumo_data.prepare --source_dir=... --output_dir=... --runner=beam
    python -m pneumo_data.prepare ... --runner=beam \
        --beam_pipeline_options="--runner=FlinkRunner --flink_master=host:8081"

The plan (:func:`pneumo_data.plan.make_plan`: every file's split, class, shard and
position) is computed once on the driver, as for the threaded writer: it needs every
file's patient id and hash. The pipeline does the per-file work::

    plan lines -> ReadFromText -> Reshuffle -> encode (read, check sha256, decode,
      encode, serialize: shard_writer.encode_record) -> key by shard -> GroupByKey ->
      write each shard (records in plan order) -> one result line per shard -> WriteToText

and the driver reads the result lines back, marks every planned entry written or
skipped, and returns the shard table and counts the manifest needs. Files, record
order and record bytes are the threaded writer's (same
:func:`pneumo_data.shard_writer.encode_record`, same :meth:`ShardGroup.shard_index`, same
:class:`~pneumo_data.records_tf.ShardWriter`), so the shards' sha256s are identical; a test
checks it.

Ownership: the driver claims every planned shard and the work folder
(``OUTPUT/.beam-work.partial``: plan and result lines) in the output folder's ledger
before the pipeline starts, so a killed run's leftovers are removed by the next run;
workers only write under those claimed names.

Where things must live: the sources, the output folder and the work folder are read
and written with the local file API, so every worker must see them at the driver's
paths: the local runners (the default: Beam's Python runner, one worker process per
core), or Flink/Spark workers on a shared mount. Workers need pneumo importable (the
local worker processes get the driver's copy on ``PYTHONPATH``; a cluster needs
``--setup_file`` or a container image). Dataflow would additionally need ``gs://``
output, which :class:`~pneumo_data.records_tf.ShardWriter` does not write today.

apache-beam is an optional extra (``pip install 'pneumo[beam]'``); without it
:func:`pipeline_options` (called by prepare before any work) raises
:class:`BeamUnavailableError`.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import logging
import os
import pickle
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from pneumo_data.common.errors import UserError
from pneumo_data.common.files import partial_path
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.records import shard_name

log = logging.getLogger("pneumo.beam_writer")

__all__ = ["BeamUnavailableError", "pipeline_options", "write_shards",
           "DEFAULT_PIPELINE_OPTIONS", "WORK_DIR"]

# Beam's DirectRunner defaults to one in-process worker and (Beam 2.77, seen here) first
# tries the Prism runner, a Go binary it downloads from GitHub. FnApiRunner is the Python
# runner the DirectRunner falls back to; here with one worker process per core.
DEFAULT_PIPELINE_OPTIONS = ("--runner=FnApiRunner --direct_running_mode=multi_processing "
                            "--direct_num_workers=0")
# Worker processes log their start-up and shut-down at INFO; added unless the options set it.
_QUIET_WORKERS = "--default_sdk_harness_log_level=WARNING"
# Claimed in the ledger under this name, written as ".beam-work.partial" and removed after
# the run: it never holds a finished output.
WORK_DIR = ".beam-work"


class BeamUnavailableError(UserError):
    """apache-beam is not installed (it is an optional extra)."""


def _import_beam():
    try:
        import apache_beam as beam
    except ImportError as error:
        raise BeamUnavailableError(
            f"--runner=beam needs apache-beam, which is not installed ({error}). Install the "
            f"extra: pip install 'pneumo[beam]'. apache-beam pins protobuf<7, pillow<13 and "
            f"pyarrow<26, so it may need its own virtualenv "
            f"(python -m venv --system-site-packages VENV && VENV/bin/pip install "
            f"'pneumo[beam]'), or use --runner=threads.") from None
    return beam


def pipeline_options(options: str | None = None):
    """Beam ``PipelineOptions`` from prepare's ``--beam_pipeline_options`` string.

    Beam's own flag syntax, split like a shell command line. Empty or None:
    :data:`DEFAULT_PIPELINE_OPTIONS` (local, one worker process per core). Workers log
    at WARNING unless the options say ``--default_sdk_harness_log_level``.

    Raises:
      BeamUnavailableError: apache-beam is not installed.
      UserError: the string is not a valid command line.
    """
    _import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions
    try:
        flags = shlex.split(options or DEFAULT_PIPELINE_OPTIONS)
    except ValueError as error:
        raise UserError(f"--beam_pipeline_options {options!r}: {error}") from None
    if not any(f.startswith(_QUIET_WORKERS.split("=")[0]) for f in flags):
        flags.append(_QUIET_WORKERS)
    return PipelineOptions(flags)


# ---------------------------------------------------------------- the pipeline's steps
# Module-level functions and callables: workers import them by name.

def _worker_modules():
    """The TensorFlow half a worker needs (the threaded writer's own step and shard writer),
    imported on a worker's first element, TensorFlow's start-up noise filtered as in the
    jobs. This module itself imports no TensorFlow, so prepare can check the Beam options
    before loading it."""
    import_tensorflow()
    from pneumo_data import records_tf, shard_writer
    return shard_writer, records_tf


def _plan_line(name: str, group: int, position: int, entry) -> str:
    # The entry goes whole (pickled): the worker calls the writer's own step on it.
    return base64.b64encode(pickle.dumps((name, group, position, entry))).decode()


class _EncodeFn:
    """Plan line -> ``(shard name, (group, position, reason, record, entry changes))``.

    The entry changes are the attributes the record step set on the worker's copy of the
    entry (the DICOM header it read, ``Entry.dicom``); the driver applies them to its own.
    """

    def __init__(self, config):
        self.config = config

    def __call__(self, line: str):
        shard_writer, _ = _worker_modules()
        name, group, position, entry = pickle.loads(base64.b64decode(line))
        before = dict(vars(entry))
        reason, record = shard_writer.encode_record(entry, self.config)
        changes = {k: v for k, v in vars(entry).items() if before.get(k, _UNSET) is not v}
        state = base64.b64encode(pickle.dumps(changes)).decode() if changes else None
        return name, (group, position, reason, record, state)


_UNSET = object()


class _Claimed:
    """Stands in for the driver's OutputDir in a worker: the names were claimed there."""

    def __init__(self, path: str):
        self.path = Path(path)

    def claim(self, rel: str) -> Path:
        return self.path / rel


class _WriteShardFn:
    """``(shard name, encoded files)`` -> the shard file, and its result line."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def __call__(self, element) -> str:
        name, items = element
        _, records_tf = _worker_modules()
        items = sorted(items, key=lambda item: item[:2])  # plan order
        writer = records_tf.ShardWriter(_Claimed(self.output_dir), name)
        fates = []
        for group, position, reason, record, state in items:
            fates.append([group, position, reason, state])
            if not reason:
                writer.write(record)
        return json.dumps({"entry": writer.close(), "fates": fates})


@contextlib.contextmanager
def _quiet_beam_logs():
    """Beam relays every worker's start-up notes (at INFO and WARNING); keep errors only."""
    logger = logging.getLogger("apache_beam")
    old = logger.level
    if old == logging.NOTSET or old < logging.ERROR:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


@contextlib.contextmanager
def _workers_import_this_copy():
    """Local worker processes import the same pneumo_data as this driver."""
    root = str(Path(__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    parts = [p for p in (old or "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in parts if p != root])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


# ---------------------------------------------------------------- the writer

def write_shards(plan, out, config) -> tuple[dict, dict]:
    """Decodes and writes ``plan``'s shards with Beam; returns (shard table, counts).

    The Beam twin of :func:`pneumo_data.shard_writer.write_shards`: same arguments but the
    thread count, same result, same entries marked written or skipped.

    Args:
      plan: a :class:`pneumo_data.plan.Plan`.
      out: the output folder's open :class:`~pneumo_data.common.outputs.OutputDir`.
      config: the :class:`~pneumo_data.prepare.PrepareConfig` (stored size, encoding,
        ``beam_pipeline_options``).

    Raises:
      BeamUnavailableError: apache-beam is not installed.
      RuntimeError: the pipeline did not produce every planned shard.
    """
    beam = _import_beam()
    options = pipeline_options(config.beam_pipeline_options)
    work = partial_path(out.claim(WORK_DIR, "dir"), is_dir=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    expected: dict[str, tuple[int, int]] = {}  # shard name -> (group, shard index)
    n_files = 0
    with open(work / "plan.txt", "w") as handle:
        for g, group in enumerate(plan.groups):
            for position, entry in enumerate(group.entries):
                index = group.shard_index(position)
                name = shard_name(group.split, group.label, index, group.shards)
                if name not in expected:
                    out.claim(name)  # write-ahead, in writing order, as the threads do
                    expected[name] = (g, index)
                handle.write(_plan_line(name, g, position, entry) + "\n")
                n_files += 1
    try:
        if n_files:
            started = time.perf_counter()
            log.info("writing %d files into %d shards with Beam (%s)", n_files,
                     len(expected), config.beam_pipeline_options or DEFAULT_PIPELINE_OPTIONS)
            with (_quiet_beam_logs(), _workers_import_this_copy(),
                  beam.Pipeline(options=options) as pipeline):
                _ = (pipeline
                     | "ReadPlan" >> beam.io.ReadFromText(str(work / "plan.txt"))
                     | "Spread" >> beam.Reshuffle()
                     | "Encode" >> beam.Map(_EncodeFn(config))
                     | "ByShard" >> beam.GroupByKey()
                     | "WriteShard" >> beam.Map(_WriteShardFn(str(out.path)))
                     | "Results" >> beam.io.WriteToText(str(work / "results")))
            log.info("Beam pipeline finished in %.1fs", time.perf_counter() - started)
        results = [json.loads(line) for path in sorted(glob.glob(str(work / "results*")))
                   for line in Path(path).read_text().splitlines() if line]
        return _assemble(plan, expected, n_files, results)
    finally:
        out.remove(WORK_DIR)


def _assemble(plan, expected: dict[str, tuple[int, int]], n_files: int,
              results: list[dict[str, Any]]) -> tuple[dict, dict]:
    by_file = {r["entry"]["file"]: r for r in results}
    missing = sorted(set(expected) - set(by_file))
    if missing or len(results) != len(by_file) or set(by_file) != set(expected):
        raise RuntimeError(f"the Beam pipeline did not write every planned shard exactly once "
                           f"(missing {missing[:5]}, {len(results)} result lines for "
                           f"{len(expected)} planned shards)")
    shard_table: dict[str, dict[str, list]] = {}
    counts: dict[str, dict[str, int]] = {}
    for group in plan.groups:  # plan order = the threaded writer's order; empty: [] and 0
        shard_table.setdefault(group.split, {})[group.label] = []
        counts.setdefault(group.split, {})[group.label] = 0
    seen = 0
    for name in sorted(expected, key=expected.get):  # by group, then shard index
        g, _ = expected[name]
        group, result = plan.groups[g], by_file[name]
        shard_table[group.split][group.label].append(result["entry"])
        counts[group.split][group.label] += int(result["entry"]["records"])
        for fate_group, position, reason, state in result["fates"]:
            entry = plan.groups[fate_group].entries[position]
            if state is not None:
                vars(entry).update(pickle.loads(base64.b64decode(state)))
            if reason:
                entry.skip(reason)
            else:
                entry.status, entry.shard = "written", name
            seen += 1
    if seen != n_files:
        raise RuntimeError(f"the Beam pipeline reported {seen} files for {n_files} planned")
    return shard_table, counts
