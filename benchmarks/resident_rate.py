r"""Input rates inside a graph: the device-resident set, the stream and the in-memory ceiling,
each consumed ``--steps`` batches per ``tf.function`` call (as a train step with
steps_per_execution does), so the Python dispatch of one call per batch (0.2-0.4 ms on a
loaded 2-vCPU box, more than a batch costs) is not what is timed. ``--before_ref`` adds the
stream of that git commit's reader, loaded into the same process, for a before/after ratio.

    python -m benchmarks.resident_rate --data_dir=data/xray224 [--steps=50 --seconds=3]
    python -m benchmarks.resident_rate --data_dir=data/xray224 --before_ref=8538b1e

Rows: ``ceiling`` (one in-memory batch repeated, a tf.data iterator), ``stream``
(``pneumo_data.train_dataset``, augment='device'), ``resident`` (``ResidentTrainSet.
next_batch``), optionally ``stream before``. Rows interleaved round by round; ``--cpu_time``
reports images per CPU-second of this process instead of per second.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from absl import flags

from benchmarks import common
from pneumo_data.common.errors import UserError

flags.DEFINE_string("data_dir", None, "A prepared data_dir.")
flags.DEFINE_integer("image_size", 150, "Side of the images.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("steps", 50, "Batches per tf.function call.")
flags.DEFINE_float("seconds", 3.0, "Seconds per timed window.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
flags.DEFINE_string("before_ref", None, "Also time the stream of this git ref's reader.")
flags.DEFINE_bool("cpu_time", False, "Images per CPU-second of this process.")
flags.DEFINE_bool("per_batch", False, "One Python call per batch instead (next() on the "
                                      "iterators, one tf.function call of next_batch): the "
                                      "regime of benchmarks.throughput's ceiling.")
flags.DEFINE_string("output_dir", None, "Results folder (default benchmarks/results).")
flags.DEFINE_string("name", None, "Result file name (default resident_rate).")
FLAGS = flags.FLAGS

CEILING = "ceiling: one in-memory batch repeated"
GATHER = "bound: tf.gather of random rows of the set (no draw, no state)"


def consume(next_batch, steps: int):
    """A tf.function taking ``steps`` batches from ``next_batch()`` (touching one pixel and
    the labels of each so nothing is pruned)."""
    import tensorflow as tf

    @tf.function
    def run():
        total = tf.constant(0.0)
        for _ in tf.range(steps):
            x, y = next_batch()
            total += tf.cast(x[0, 0, 0, 0], tf.float32) + tf.reduce_sum(y)
        return total
    return run


def per_batch(next_batch, compiled: bool):
    """One batch per Python call (``steps`` is then 1): the iterators' ``next`` as it is, the
    resident set's ``next_batch`` as one ``tf.function`` call."""
    import tensorflow as tf
    fn = tf.function(next_batch) if compiled else next_batch

    def run():
        x, _ = fn()
        return x
    return run


def before_stream(ref: str):
    """``train_dataset`` of git ``ref``'s ``pneumo_data`` package (a worktree-free export into
    a temporary folder, imported under another name)."""
    import importlib
    import subprocess
    import sys
    import tempfile
    root = Path(__file__).resolve().parents[1]
    folder = Path(tempfile.mkdtemp(prefix="pneumo-before-"))
    archive = subprocess.run(["git", "-C", str(root), "archive", ref, "pneumo_data"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "pneumo_data").rename(folder / "pneumo_data_before")
    for path in (folder / "pneumo_data_before").rglob("*.py"):
        text = path.read_text()
        path.write_text(text.replace("pneumo_data.", "pneumo_data_before.")
                        .replace("from pneumo_data import", "from pneumo_data_before import"))
    sys.path.insert(0, str(folder))
    return importlib.import_module("pneumo_data_before.reader").train_dataset


def rates(data_dir, size, batch, steps, seconds, rounds, before=None, cpu_time=False,
          one_per_call=False):
    import tensorflow as tf

    import pneumo_data
    from pneumo_data import reader
    from pneumo_data.config import PipelineConfig
    first = next(iter(pneumo_data.train_dataset(data_dir, batch_size=batch, image_size=size,
                                                augment="none")))
    ceiling_it = iter(tf.data.Dataset.from_tensors(first).repeat().prefetch(tf.data.AUTOTUNE))
    stream_it = iter(pneumo_data.train_dataset(data_dir, batch_size=batch, image_size=size,
                                               augment="device", seed=0))
    if one_per_call:
        steps = 1

    def wrap(next_batch, compiled=False):
        return per_batch(next_batch, compiled) if one_per_call else consume(next_batch, steps)

    rows = {CEILING: wrap(lambda: next(ceiling_it)),
            "stream (train_dataset, this checkout)": wrap(lambda: next(stream_it))}
    if before is not None:
        old_it = iter(before(data_dir, batch_size=batch, image_size=size, augment="device",
                             seed=0))
        rows["stream (train_dataset, before)"] = wrap(lambda: next(old_it))
    config = PipelineConfig(batch_size=batch, image_size=size, augment="device",
                            residency="device")
    source, reason = reader.resident_or_stream(data_dir, config, seed=0)
    if reason is None:
        rows["device-resident set (next_batch)"] = wrap(source.next_batch, compiled=True)
        # What any draw of fresh rows must pay and the ceiling does not: copying a batch of
        # images from random rows of the set (the ceiling hands out one batch, never copied).
        picks = tf.random.stateless_uniform([64, batch], [0, 1], 0, source.count, tf.int64)
        counter = tf.Variable(0, dtype=tf.int64)

        def bare_gather():
            i = counter.assign_add(1) % 64
            return tf.gather(source.images, picks[i]), tf.gather(source.labels, picks[i])
        rows[GATHER] = wrap(bare_gather, compiled=True)
    for run in rows.values():
        for _ in range(3 if not one_per_call else 200):  # trace, fill caches and buffers
            run()
    out = {name: [] for name in rows}
    for _ in range(rounds):
        for name, run in rows.items():
            start, cpu, n = time.perf_counter(), time.process_time(), 0
            while time.perf_counter() - start < seconds:
                result = run()
                n += 1
            if not one_per_call:
                result.numpy()
            spent = (time.process_time() - cpu) if cpu_time else time.perf_counter() - start
            out[name].append(n * steps * batch / spent)
    return out, reason


def main(argv):
    del argv
    if not FLAGS.data_dir or not (Path(FLAGS.data_dir) / "manifest.json").is_file():
        raise UserError(f"--data_dir {FLAGS.data_dir} holds no manifest.json (a folder "
                        f"written by python -m pneumo_data.prepare)")
    name = FLAGS.name or "resident_rate"
    common.check_writable(*common.result_paths(name, FLAGS.output_dir))
    from pneumo_data.common.jobs import import_tensorflow
    import_tensorflow()
    before = before_stream(FLAGS.before_ref) if FLAGS.before_ref else None
    load_before = common.load_average()
    raw, reason = rates(FLAGS.data_dir, FLAGS.image_size, FLAGS.batch_size, FLAGS.steps,
                        FLAGS.seconds, FLAGS.rounds, before, FLAGS.cpu_time, FLAGS.per_batch)
    load_after = common.load_average()
    top = statistics.median(raw[CEILING])
    unit = "img per CPU-second" if FLAGS.cpu_time else "img/s"
    table = common.markdown_table(
        [f"input, in-graph ({unit})", "median", "range", "of ceiling"],
        [[k, statistics.median(v), f"{min(v):,.0f}-{max(v):,.0f}",
          f"{statistics.median(v) / top:.1%}"] for k, v in raw.items()])
    table += (f"\n\n{common.machine_line()}; load {load_before} -> {load_after}. "
              f"{FLAGS.data_dir} at {FLAGS.image_size} px, batch {FLAGS.batch_size}, "
              f"{1 if FLAGS.per_batch else FLAGS.steps} batch(es) per call, "
              f"{FLAGS.rounds} interleaved rounds x "
              f"{FLAGS.seconds:g} s." + (f" Resident set refused: {reason}" if reason else ""))
    common.write_results(name, FLAGS.output_dir, {
        "environment": common.environment(), "load_before": load_before,
        "load_after": load_after, "unit": unit, "data_dir": FLAGS.data_dir,
        "before_ref": FLAGS.before_ref, "rates": raw,
        "of_ceiling": {k: statistics.median(v) / top for k, v in raw.items()},
        "resident_refused": reason}, table)


if __name__ == "__main__":
    common.run(main)
