r"""Augmentation alone, before against after in one process: a reference ``augment.py`` (by
default the one at git ref ``--before_ref``, loaded from git into this process) against this
checkout's, and the five-layer keras-cv chain, rows interleaved round by round.

    python -m benchmarks.augment_compare --one_thread --cpu_time    # per-core cost
    python -m benchmarks.augment_compare --before_ref=8538b1e       # wall clock

``--cpu_time`` divides by the process's CPU time instead of wall time and ``--one_thread``
runs TensorFlow on one thread (no spinning thread pool): on a shared machine that measures
the cost per image, which other processes' load barely moves. Ratios are to the chain on
float32 input (what ``image_dataset_from_directory`` hands it) and, for every 'after' row, to
the 'before' row of the same recipe and input. Both recipes run on uint8 input (what the
stream delivers; the fused back end) and on float32 input (the fallback path). Batch 32,
150 px by default. The last line checks issue 21's targets: the default recipe (affine +
intensity) at least 5x the chain and the affine part alone at least 8x, on uint8 input.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from absl import flags

from benchmarks import common
from pneumo_data.common.errors import UserError

flags.DEFINE_string("before_ref", "040ab7c", "Git ref whose pneumo_data/augment.py is "
                    "'before'. It is loaded alone: in a ref from after the augmentation was split "
                    "into pneumo_data/augment_*.py, its imports of those modules take this "
                    "checkout's, so compare against refs before the split or use --before_file.")
flags.DEFINE_string("before_file", None, "An augment.py file to use as 'before' instead.")
flags.DEFINE_integer("image_size", 150, "Side of the images.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_float("seconds", 2.0, "Seconds per row and round.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds (the median is reported).")
flags.DEFINE_bool("one_thread", False, "TensorFlow on one thread.")
flags.DEFINE_bool("cpu_time", False, "Images per CPU-second of this process, not per second.")
flags.DEFINE_string("output_dir", None, "Results folder (default benchmarks/results).")
flags.DEFINE_string("name", None, "Result file name (default augment_compare[-cpu]).")
FLAGS = flags.FLAGS

ROOT = Path(__file__).resolve().parents[1]


def before_path(ref: str, file: str | None) -> str:
    """``file``, or ``pneumo_data/augment.py`` at git ``ref`` written to a temporary file."""
    if file:
        if not Path(file).is_file():
            raise UserError(f"--before_file {file} does not exist")
        return file
    try:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:pneumo_data/augment.py"],
                              check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise UserError(f"--before_ref {ref}: git cannot show its augment.py "
                        f"({getattr(error, 'stderr', '') or error})".strip()) from None
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as out:
        out.write(text)
    return out.name


def checkout_ref() -> str:
    """This checkout's commit (short), with "+changes" when the augmentation's modules
    (``pneumo_data/augment*.py``) differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD") or "?"
        changed = git("status", "--porcelain", "--", "pneumo_data/augment*.py")
    except OSError:
        return "?"
    return head + ("+changes" if changed else "")


def load_module(path: str, name: str = "augment_before"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(old, size: int, batch: int) -> dict:
    """{row name: a tf.function augmenting one in-memory batch}."""
    import numpy as np
    import tensorflow as tf

    from pneumo_data import augment as new
    from pneumo_data.config import AugmentConfig
    x8 = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, size, size, 1))
                     .astype(np.uint8))
    xf = tf.cast(x8, tf.float32)
    chain = common.five_keras_cv_layers()

    def run_chain(x):
        for layer in chain:
            x = layer(x)
        return x

    out = {CHAIN: tf.function(lambda: run_chain(xf))}
    for name, params in (("affine", AugmentConfig.seed_recipe()), ("default", AugmentConfig())):
        for kind, images in (("uint8", x8), ("float32", xf)):
            for when, module in (("before", old), ("after", new)):
                layer = module.RandomAffine.from_params(params)
                out[f"{when}: {name} ({kind} in)"] = tf.function(
                    lambda layer=layer, images=images: layer(images, training=True))
    return out


CHAIN = "five keras-cv layers (float32 in)"
TARGETS = {"after: default (uint8 in)": 5.0, "after: affine (uint8 in)": 8.0}


def measure(functions: dict, batch: int, seconds: float, rounds: int, cpu_time: bool):
    """{row: [rate per round]}, rows interleaved within each round."""
    for fn in functions.values():  # trace and warm up
        fn()
        fn()
    out = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            start, cpu, n = time.perf_counter(), time.process_time(), 0
            while time.perf_counter() - start < seconds:
                fn().numpy()
                n += 1
            spent = (time.process_time() - cpu) if cpu_time else time.perf_counter() - start
            out[name].append(batch * n / spent)
    return out


def main(argv):
    del argv
    old_file = before_path(FLAGS.before_ref, FLAGS.before_file)
    common.check_writable(*common.result_paths(FLAGS.name or "augment_compare",
                                               FLAGS.output_dir))
    from pneumo_data.common.jobs import import_tensorflow
    tf = import_tensorflow()
    if FLAGS.one_thread:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    old = load_module(old_file)
    after = checkout_ref()
    load_before = common.load_average()
    raw = measure(rows(old, FLAGS.image_size, FLAGS.batch_size), FLAGS.batch_size,
                  FLAGS.seconds, FLAGS.rounds, FLAGS.cpu_time)
    load_after = common.load_average()
    median = {name: statistics.median(v) for name, v in raw.items()}
    chain = median[CHAIN]
    over_before = {name: rate / median[name.replace("after:", "before:")]
                   for name, rate in median.items() if name.startswith("after:")}
    unit = "img per CPU-second" if FLAGS.cpu_time else "img/s"
    table_rows = [[name, median[name], f"{min(v):,.0f}-{max(v):,.0f}",
                   f"{median[name] / chain:.2f}x",
                   f"{over_before[name]:.2f}x" if name in over_before else ""]
                  for name, v in raw.items()]
    table = common.markdown_table([f"augmentation alone ({unit})", "median", "range",
                                   "vs chain", "after vs before"], table_rows)
    checks = [f"{name.split(': ')[1]} {median[name] / chain:.2f}x (target {target:g}x: "
              f"{'met' if median[name] / chain >= target else 'not met'})"
              for name, target in TARGETS.items()]
    table += (f"\n\n{common.machine_line()}; load {load_before} -> {load_after}. "
              f"Batch {FLAGS.batch_size}, {FLAGS.image_size} px, {FLAGS.rounds} interleaved "
              f"rounds x {FLAGS.seconds:g} s per row; one TF thread: {FLAGS.one_thread}. "
              f"'before' = pneumo_data/augment.py at {FLAGS.before_file or FLAGS.before_ref}, "
              f"loaded into the same process; 'after' = this checkout ({after}).\n\n"
              f"Issue 21 targets, vs the chain: " + "; ".join(checks) + ".")
    print(table, flush=True)
    name = FLAGS.name or ("augment_compare-cpu" if FLAGS.cpu_time else "augment_compare")
    common.write_results(name, FLAGS.output_dir, {
        "environment": common.environment(), "load_before": load_before,
        "load_after": load_after, "unit": unit, "one_thread": FLAGS.one_thread,
        "before": FLAGS.before_file or FLAGS.before_ref, "after": after, "rates": raw,
        "over_chain": {k: rate / chain for k, rate in median.items()},
        "over_before": over_before,
        "targets": {k: {"over_chain": median[k] / chain, "target": t,
                        "met": median[k] / chain >= t} for k, t in TARGETS.items()}}, table)


if __name__ == "__main__":
    common.run(main)
