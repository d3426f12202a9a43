r"""Training throughput per model x precision x XLA, from memory and from the pipeline.

    python -m benchmarks.train_step                      # embedded data, all models
    python -m benchmarks.train_step --source_dir=../shared/data/chest_xray_224 \
        --models=manual_cnn,vgg16 --precisions=float32,mixed_bfloat16 --plot

For each combination: images/s of ``model.fit`` fed from one in-memory batch
(the model alone), then fed by ``pneumo_data.train_dataset`` with device
augmentation (the real input). ``input kept up`` is true when the step time with
real input is within 5% of the in-memory step time. Compilation and warm-up
steps are excluded; each rate is the median of --repeats windows of --steps.
On a GPU the JSON also records peak GPU memory per combination.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from absl import flags

from benchmarks import common
from pneumo_data.common.jobs import import_tensorflow

flags.DEFINE_list("models", ["bn_cnn", "manual_cnn", "vgg16", "resnet50"],
                  "Models to time.")
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16", "mixed_float16"],
                  "Dtype policies to time.")
flags.DEFINE_list("jit", ["false", "true"], "XLA settings to time.")
flags.DEFINE_integer("steps", 5, "Steps per timed window.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("repeats", 2, "Timed windows per cell.")
flags.DEFINE_bool("pipeline", True, "Also time with the real pipeline feeding.")
common.define_common_flags()
FLAGS = flags.FLAGS


def _rate(model, dataset, steps: int, warmup: int, repeats: int, batch: int) -> dict:
    """One fit call; batch-end timestamps split it into warm-up and timed windows."""
    import keras
    stamps = []
    clock = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: stamps.append(time.perf_counter()))
    warmup = max(1, warmup)
    model.fit(dataset, steps_per_epoch=warmup + repeats * steps, epochs=1, verbose=0,
              callbacks=[clock], shuffle=False)
    return common.window_rates(stamps, warmup, steps, repeats, batch)


def _note(precision: str) -> str:
    """Why a precision may be slow on this device (it is still timed)."""
    import tensorflow as tf

    from pneumo_models import precision as p
    on_cpu = not tf.config.list_physical_devices("GPU")
    if precision == "mixed_bfloat16" and on_cpu and not p.cpu_has_fast_bf16():
        return "CPU without AMX/AVX512-BF16: bf16 is emulated"
    if precision == "mixed_float16" and on_cpu:
        return "CPU: no float16 hardware path"
    return ""


def _cell_line(cell: dict) -> str:
    """One readable line per measured cell."""
    what = f"{cell['model']} {cell['precision']} jit={cell['jit_compile']}"
    if "error" in cell:
        return f"{what}: failed: {cell['error']}"
    rates = [f"{k} {cell[k]['median']:,.1f} img/s" for k in ("memory", "pipeline") if k in cell]
    return f"{what}: " + ", ".join(rates)


def run_cell(name, precision, jit, data_dir, size, batch, flags_) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import pneumo_data
    from pneumo_models.models import build_model
    keras.backend.clear_session()
    common.reset_gpu_peak()
    model = build_model(name, image_size=size, weights="none", precision=precision,
                        augment=True, augment_backend="gather" if jit else "fused", seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  jit_compile=jit)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 1)).astype(np.uint8)
    labels = (np.arange(batch) % 2).astype(np.float32)[:, None]
    memory = tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)
    cell = {"model": name, "precision": precision, "jit_compile": jit}
    start = time.perf_counter()
    cell["memory"] = _rate(model, memory, flags_.steps, flags_.warmup_steps, flags_.repeats,
                           batch)
    if flags_.pipeline:
        stream = pneumo_data.train_dataset(data_dir, batch_size=batch, image_size=size,
                                           augment="device", seed=0)
        cell["pipeline"] = _rate(model, stream, flags_.steps, flags_.warmup_steps,
                                 flags_.repeats, batch)
        ratio = cell["pipeline"]["median"] / cell["memory"]["median"]
        cell["pipeline_over_memory"] = ratio
        cell["input_kept_up"] = ratio >= 1 / 1.05
    cell["seconds"] = time.perf_counter() - start
    cell["gpu_memory"] = common.gpu_memory()
    return cell


def main(argv):
    del argv
    source_dir = common.source_dir(FLAGS.source_dir)  # refused before TensorFlow loads
    name = FLAGS.name or f"train_step-{Path(source_dir).name}"
    common.check_writable(*common.result_paths(name, FLAGS.output_dir, FLAGS.plot))
    import_tensorflow()  # TensorFlow's start-up and C++ INFO lines filtered (see jobs)
    from pneumo_data.prepare import PrepareConfig, prepare
    size, batch = FLAGS.image_size, FLAGS.batch_size
    work = tempfile.mkdtemp(prefix="pneumo-bench-train-step-")
    cells = []
    try:
        prepare(PrepareConfig(source_dir=source_dir, output_dir=work, progress=False))
        for name in FLAGS.models:
            for precision in FLAGS.precisions:
                note = _note(precision)
                for jit_flag in FLAGS.jit:
                    jit = jit_flag.lower() == "true"
                    try:
                        cell = run_cell(name, precision, jit, work, size, batch, FLAGS)
                    except Exception as error:  # recorded, not hidden: a cell can fail alone
                        cell = {"model": name, "precision": precision, "jit_compile": jit,
                                "error": f"{type(error).__name__}: {error}"[:500]}
                    cell["note"] = note
                    cells.append(cell)
                    print(_cell_line(cell), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for c in cells:
        if "error" in c:
            rows.append([c["model"], c["precision"], c["jit_compile"], "failed", "", "", "",
                         c["error"][:80]])
            continue
        pipe = c.get("pipeline", {}).get("median")
        rows.append([c["model"], c["precision"], "on" if c["jit_compile"] else "off",
                     c["memory"]["median"], pipe if pipe is not None else "",
                     f"{c['pipeline_over_memory']:.0%}" if pipe else "",
                     ("yes" if c["input_kept_up"] else "no") if pipe else "", c["note"]])
    table = common.markdown_table(
        ["model", "precision", "XLA", "img/s from memory", "img/s from pipeline",
         "pipeline / memory", "input kept up (within 5%)", "note"], rows)
    table += (f"\n\n{size}x{size}, batch {batch}, median of {FLAGS.repeats} windows of "
              f"{FLAGS.steps} steps after {FLAGS.warmup_steps} warm-up steps; weights random "
              f"(speed does not depend on them); backbones frozen as in training.")
    path = common.write_results(name, FLAGS.output_dir, {
        "environment": common.environment(), "source_dir": source_dir, "image_size": size,
        "batch_size": batch, "steps": FLAGS.steps, "repeats": FLAGS.repeats, "cells": cells},
        table)
    if FLAGS.plot:
        values = {f"{c['model']} {c['precision']} XLA {'on' if c['jit_compile'] else 'off'}":
                  c["memory"]["median"] for c in cells if "memory" in c}
        common.bar_chart(path.with_suffix(".png"), values, "training images/s (from memory)",
                         f"Training throughput, {size}x{size}, batch {batch}")


if __name__ == "__main__":
    common.run(main)
