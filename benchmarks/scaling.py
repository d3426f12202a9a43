r"""Training images/s against replicas and against tf.data service workers.

    python -m benchmarks.scaling                                  # embedded data
    python -m benchmarks.scaling --source_dir=../shared/data/chest_xray_224 --replicas=1,2,4
    python -m benchmarks.scaling --sections=fit --rounds=4        # fit against the loop

Every cell runs in its own child process (replica counts need logical devices
configured before TensorFlow starts, and two MirroredStrategy objects in one
process clash in their collective groups), one after another, in one run, so the
ratios between cells are comparable. Cells:

* ``fit`` and ``loop``: one device, the same model and stream, Keras ``model.fit``
  against :class:`pneumo_models.loop.TrainingLoop`, each with 1 and
  ``--steps_per_execution`` steps per call;
* ``replicas``: the loop under MirroredStrategy over R devices (real GPUs when
  present, else R logical CPU devices sharing the same cores), global batch
  ``--batch_size`` split over them;
* ``service``: the loop on one device fed by tf.data service with W workers
  (dispatcher and workers in the child process, as in-process servers), against
  the local pipeline; and the input stream alone (no model) from each.

The loop is the training job's (:class:`pneumo_models.loop.TrainingLoop`, the job's
optimizer and loss objects); the model is compiled with the same optimizer and loss for
``fit``.

On a machine with 2 CPU cores this shows the cost of the machinery (all-reduce,
gathers, service RPCs) and that features work, not speedups: logical CPU
devices and in-process service workers share the same two cores as the model.
Each rate is the median of ``--repeats`` windows of ``--steps`` steps after
warm-up; compilation is excluded.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

from benchmarks import common
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.prepare import PrepareConfig, prepare

flags.DEFINE_string("model", "manual_cnn", "Model to train.")
flags.DEFINE_string("precision", "auto", "Dtype policy (auto: per device).")
flags.DEFINE_list("replicas", ["1", "2"], "Replica counts to time.")
flags.DEFINE_list("service_workers", ["1", "2"], "tf.data service worker counts to time.")
flags.DEFINE_integer("steps_per_execution", 4, "Steps per tf.function call (besides 1).")
flags.DEFINE_integer("steps", 12, "Global steps per timed window.")
flags.DEFINE_integer("warmup_steps", 4, "Untimed steps after compilation.")
flags.DEFINE_integer("repeats", 3, "Timed windows per cell.")
flags.DEFINE_integer("rounds", 1, "Times the whole plan runs, cells interleaved (the table "
                                   "shows the median over rounds: steadier on a shared machine).")
flags.DEFINE_float("shard_mb", 1.0, "Shard size when preparing (several files per class for "
                                    "the service and for several input pipelines).")
flags.DEFINE_list("sections", ["fit", "replicas", "service", "input"],
                  "Which groups of cells to run.")
flags.DEFINE_string("cell", None, "Internal: run one cell (JSON) and print its result.")
common.define_common_flags()
FLAGS = flags.FLAGS

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- one cell (child process)

def _configure_devices(replicas: int) -> list[str]:
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if replicas > len(gpus):
            raise ValueError(f"{replicas} replicas asked, {len(gpus)} GPUs present")
        return [f"/gpu:{i}" for i in range(replicas)]
    cpu = tf.config.list_physical_devices("CPU")[0]
    if replicas > 1:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]


def _windows(stamps: list[float], warmup: int, steps: int, repeats: int, batch: int) -> dict:
    """images/s over windows of ``steps`` steps; ``stamps[i]`` is the time after step i+1."""
    return common.window_rates(stamps, warmup, steps, repeats, batch)


def _clock():
    """A Keras callback recording a timestamp per finished step (an execution of k steps
    gives k stamps, its time divided evenly: exact over windows of whole executions)."""
    import keras

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.stamps, self.last = [], None

        def on_train_batch_begin(self, batch, logs=None):
            if self.last is None:
                self.last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            done = batch + 1 - len(self.stamps)
            step = (now - self.last) / max(done, 1)
            self.stamps += [self.last + step * (i + 1) for i in range(done)]
            self.last = now

    return Clock()


def run_cell(cell: dict) -> dict:
    devices = _configure_devices(cell.get("replicas", 1))
    import keras
    import tensorflow as tf

    from pneumo_data import reader
    from pneumo_models import models
    from pneumo_models.loop import TrainingLoop, default_metrics
    from pneumo_models.precision import resolve_precision

    data, size, batch = cell["data_dir"], cell["image_size"], cell["batch_size"]
    steps, warmup, repeats = cell["steps"], cell["warmup_steps"], cell["repeats"]
    spe = cell.get("spe", 1)
    total = warmup + repeats * steps
    servers = []
    address = None
    if cell.get("workers"):
        sv = tf.data.experimental.service
        dispatcher = sv.DispatchServer(sv.DispatcherConfig(port=0))
        servers = [dispatcher] + [sv.WorkerServer(sv.WorkerConfig(
            dispatcher._address, port=0)) for _ in range(cell["workers"])]
        address = dispatcher.target

    def stream(ctx=None, augment="device"):
        return reader.train_dataset(data, batch_size=batch, image_size=size, seed=0,
                                    augment=augment, input_context=ctx, service=address,
                                    job_name=f"bench-{augment}" if address else None)

    result = dict(cell)
    if cell["kind"] == "input":
        iterator = iter(stream(augment=cell["augment"]))
        for _ in range(warmup):
            next(iterator)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                next(iterator)
            rates.append(steps * batch / (time.perf_counter() - start))
        result["rate"] = {"median": statistics.median(rates), "min": min(rates),
                          "max": max(rates)}
        return result

    precision = resolve_precision(cell["precision"])
    result["precision_resolved"] = precision
    if cell["kind"] == "fit":
        strategy = tf.distribute.get_strategy()
    elif len(devices) > 1:
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.OneDeviceStrategy(devices[0])
    with strategy.scope():
        model = models.build_model(cell["model"], image_size=size, weights="none",
                                   precision=precision, augment=True, seed=0)
        # The loop's own metrics (default_metrics) are the same four.
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.BinaryCrossentropy(), metrics=default_metrics(),
                      steps_per_execution=spe, jit_compile=False)
    clock = _clock()
    total = -(-total // spe) * spe
    if cell["kind"] == "fit":
        model.fit(stream(), steps_per_epoch=total, epochs=1, verbose=0, callbacks=[clock],
                  shuffle=False)
    else:
        loop = TrainingLoop(model, strategy, optimizer=model.optimizer, loss=model.loss,
                            steps_per_execution=spe)
        loop.fit(lambda ctx: stream(ctx), batch_size=batch, steps_per_epoch=total, epochs=1,
                 callbacks=[clock])
    # Whole executions only: round the warm-up and the windows to multiples of spe.
    w = -(-warmup // spe) * spe
    s = -(-steps // spe) * spe
    usable = (len(clock.stamps) - w) // s
    result["rate"] = _windows(clock.stamps, w, s, min(repeats, usable), batch)
    result["replicas_in_sync"] = strategy.num_replicas_in_sync
    result["servers"] = len(servers)  # (kept referenced until here)
    return result


# ---------------------------------------------------------------- the driver

def _child(cell: dict) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling",
                           f"--cell={json.dumps(cell)}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {**cell, "error": (lines[-1] if lines else f"exit {proc.returncode}")[:400]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - start
    return result


def _rate(c):
    return c.get("rate", {}).get("median")


def _combine(results: list[dict]) -> dict:
    """One cell from its rounds: the median of the rounds' medians (errors kept)."""
    good = [r for r in results if _rate(r)]
    cell = dict(results[0])
    cell.pop("rate", None)
    cell["rounds"] = [_rate(r) for r in results]
    if good:
        cell["rate"] = {"median": statistics.median(_rate(r) for r in good),
                        "min": min(r["rate"]["min"] for r in good),
                        "max": max(r["rate"]["max"] for r in good)}
        cell.pop("error", None)
    return cell


def main(argv):
    del argv
    if FLAGS.cell:
        import_tensorflow()  # TensorFlow's start-up and C++ INFO lines filtered (see jobs)
        print(json.dumps(run_cell(json.loads(FLAGS.cell))), flush=True)
        return
    source_dir = common.source_dir(FLAGS.source_dir)  # refused before TensorFlow loads
    size, batch, spe = FLAGS.image_size, FLAGS.batch_size, FLAGS.steps_per_execution
    name = FLAGS.name or f"scaling-{Path(source_dir).name}"
    common.check_writable(*common.result_paths(name, FLAGS.output_dir))  # before the work
    import_tensorflow()
    work = tempfile.mkdtemp(prefix="pneumo-bench-scaling-")
    base = {"image_size": size, "batch_size": batch, "steps": FLAGS.steps,
            "warmup_steps": FLAGS.warmup_steps, "repeats": FLAGS.repeats,
            "model": FLAGS.model, "precision": FLAGS.precision}
    cells = []
    try:
        m = prepare(PrepareConfig(source_dir=common.class_root(source_dir), output_dir=work,
                                  progress=False, val_fraction=0.0, test_fraction=0.0,
                                  resplit="all", shard_mb=FLAGS.shard_mb))
        base["data_dir"] = work
        files = {c: len(m.shard_paths("train", c)) for c in m.classes}
        sections, plan = set(FLAGS.sections), []
        if "fit" in sections:
            plan += [dict(kind="fit", spe=1), dict(kind="loop", spe=1)]
            if spe > 1:
                plan += [dict(kind="fit", spe=spe), dict(kind="loop", spe=spe)]
        if "replicas" in sections:
            plan += [dict(kind="loop", spe=spe, replicas=int(r)) for r in FLAGS.replicas]
        if "service" in sections:
            plan += [dict(kind="loop", spe=spe, workers=int(w)) for w in FLAGS.service_workers]
        if "input" in sections:
            for augment in ("device", "host"):
                plan += [dict(kind="input", augment=augment)]
                plan += [dict(kind="input", augment=augment, workers=int(w))
                         for w in FLAGS.service_workers]
        runs = [[] for _ in plan]
        for round_ in range(FLAGS.rounds):
            for i, item in enumerate(plan):
                cell = _child({**base, **item})
                runs[i].append(cell)
                print(round_, {k: v for k, v in cell.items() if k != "data_dir"}, flush=True)
        cells = [_combine(results) for results in runs]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    fit1 = next((_rate(c) for c in cells if c["kind"] == "fit" and c["spe"] == 1), None)
    rows = []
    for c in cells:
        if c["kind"] == "input":
            continue
        where = ("model.fit" if c["kind"] == "fit" else "loop") + f", {c['spe']} step(s)/call"
        devices = f"{c.get('replicas', 1)} replica(s)"
        feed = f"service, {c['workers']} worker(s)" if c.get("workers") else "local pipeline"
        rate = _rate(c)
        rows.append([where, devices, feed, rate if rate else "failed",
                     f"{rate / fit1:.2f}" if rate and fit1 else "",
                     c.get("error", "")[:80]])
    table = common.markdown_table(
        ["trainer", "devices", "input", "img/s", "vs fit (1 step/call)", "error"], rows)
    rows = []
    for c in cells:
        if c["kind"] != "input":
            continue
        feed = f"service, {c['workers']} worker(s)" if c.get("workers") else "local pipeline"
        rows.append([c["augment"], feed, _rate(c) or "failed", c.get("error", "")[:80]])
    table += "\n\nInput stream alone (no model):\n\n" + common.markdown_table(
        ["augmentation", "input", "img/s", "error"], rows)
    env = common.environment()
    table += (f"\n\n{FLAGS.model}, {size}x{size}, global batch {batch}, precision "
              f"{FLAGS.precision}; median of {FLAGS.repeats} windows of {FLAGS.steps} steps "
              f"after {FLAGS.warmup_steps} warm-up steps, each cell in its own process, one "
              f"after another; median over {FLAGS.rounds} round(s) of the whole plan. Shard "
              f"files per class: {files}. "
              + ("Replicas are GPUs." if env["gpus"] else
                 "Replicas are logical CPU devices and service workers run in the same "
                 "process: all share the machine's cores, so these numbers measure overhead, "
                 "not scaling."))
    common.write_results(name, FLAGS.output_dir, {
        "environment": env, "source_dir": source_dir, "image_size": size, "batch_size": batch,
        "steps": FLAGS.steps, "repeats": FLAGS.repeats, "rounds": FLAGS.rounds,
        "shard_files": files, "command": " ".join(sys.argv),
        "cells": [{k: v for k, v in c.items() if k != "data_dir"} for c in cells]}, table)


if __name__ == "__main__":
    common.run(main)
