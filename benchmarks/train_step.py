r"""Training throughput per model x precision x XLA, from memory and from the pipeline.

    python -m benchmarks.train_step                      # embedded data, all models
    python -m benchmarks.train_step --source_dir=../shared/data/chest_xray_224 \
        --models=manual_cnn,vgg16 --precisions=float32,mixed_bfloat16 --plot
    # bn_cnn's stems side by side in float32 (issue 20), interleaved rounds:
    python -m benchmarks.train_step --source_dir=../shared/data/chest_xray_224 \
        --models=bn_cnn --stems=conv,patch4 --precisions=float32 --jit=false --rounds=3

For each combination: images/s of ``model.fit`` fed from one in-memory batch
(the model alone), then fed by ``pneumo_data.train_dataset`` with device
augmentation (the real input). ``input kept up`` is true when the step time with
real input is within 5% of the in-memory step time. Compilation and warm-up
steps are excluded; each rate is the median of --repeats windows of --steps.
On a GPU the JSON also records peak GPU memory per combination.

``--stems`` times bn_cnn once per stem (default ``patch4``, the default network's; ``conv``,
issue 10's; other models ignore it).
``--rounds`` repeats the whole grid that many times, in turn, and keeps each cell's median
over the rounds: on a shared or throttling machine a load change then hits every cell alike
instead of whichever cell ran during it. The table gives each cell's rate relative to the
first stem of the same model, precision and XLA setting (measured in the same rounds).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from absl import flags

from benchmarks import common
from pneumo_data.common.errors import UserError
from pneumo_data.common.jobs import import_tensorflow
from pneumo_models.config import STEMS

flags.DEFINE_list("models", ["bn_cnn", "manual_cnn", "vgg16", "resnet50"],
                  "Models to time.")
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16", "mixed_float16"],
                  "Dtype policies to time.")
flags.DEFINE_list("jit", ["false", "true"], "XLA settings to time.")
flags.DEFINE_integer("steps", 5, "Steps per timed window.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("repeats", 2, "Timed windows per cell.")
flags.DEFINE_bool("pipeline", True, "Also time with the real pipeline feeding.")
flags.DEFINE_list("stems", ["patch4"],
                  "bn_cnn stems to time (patch4: the default network's; conv: issue 10's).")
flags.DEFINE_integer("rounds", 1, "Times the whole grid is measured, in turn (median kept).")
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
    stem = f" ({cell['stem']} stem)" if cell.get("stem") else ""
    what = f"{cell['model']}{stem} {cell['precision']} jit={cell['jit_compile']}"
    if "error" in cell:
        return f"{what}: failed: {cell['error']}"
    rates = [f"{k} {cell[k]['median']:,.1f} img/s" for k in ("memory", "pipeline") if k in cell]
    return f"{what}: " + ", ".join(rates)


def run_cell(name, precision, jit, data_dir, size, batch, flags_, stem=None) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import pneumo_data
    from pneumo_models.models import build_model
    keras.backend.clear_session()
    common.reset_gpu_peak()
    model = build_model(name, image_size=size, weights="none", precision=precision,
                        augment=True, augment_backend="gather" if jit else "fused", seed=0,
                        **({"stem": stem} if stem else {}))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  jit_compile=jit)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 1)).astype(np.uint8)
    labels = (np.arange(batch) % 2).astype(np.float32)[:, None]
    memory = tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)
    cell = {"model": name, "precision": precision, "jit_compile": jit}
    if stem:
        cell["stem"] = stem
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


def _loadavg() -> float | None:
    """The 1-minute load average now (None where unreadable)."""
    try:
        return float(common.load_average().split()[0])
    except (ValueError, IndexError):
        return None


def _merge(rounds: list[dict]) -> dict:
    """One cell from its rounds: the median of each rate over the rounds that worked."""
    ok = [c for c in rounds if "error" not in c]
    if not ok:
        return rounds[0]
    cell = dict(ok[0])
    for part in ("memory", "pipeline"):
        if part in cell:
            cell[part] = dict(cell[part],
                              median=statistics.median(c[part]["median"] for c in ok))
    if "pipeline" in cell:
        cell["pipeline_over_memory"] = cell["pipeline"]["median"] / cell["memory"]["median"]
        cell["input_kept_up"] = cell["pipeline_over_memory"] >= 1 / 1.05
    cell["rounds"] = [{k: c.get(k) for k in ("memory", "pipeline", "loadavg", "error")}
                      for c in rounds]
    return cell


def _relative(cells: list[dict]) -> None:
    """Adds ``memory_vs_first_stem``: each bn_cnn cell's rate over the first stem's, per
    round (then the median), for the same precision and XLA setting."""
    first = {}
    for c in cells:
        key = (c["model"], c["precision"], c["jit_compile"])
        if "error" in c or "memory" not in c:
            continue
        if key not in first:
            first[key] = c
            continue
        ratios = [a["memory"]["median"] / b["memory"]["median"]
                  for a, b in zip(c["rounds"], first[key]["rounds"])
                  if a.get("memory") and b.get("memory")]
        if ratios:
            c["memory_vs_first_stem"] = statistics.median(ratios)


def main(argv):
    del argv
    for stem in FLAGS.stems:  # refused in one line, before TensorFlow loads
        if stem not in STEMS:
            raise UserError(f"--stems: {stem!r} is not one of {STEMS}")
    if FLAGS.rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {FLAGS.rounds}")
    source_dir = common.source_dir(FLAGS.source_dir)  # refused before TensorFlow loads
    result_name = FLAGS.name or f"train_step-{Path(source_dir).name}"
    common.check_writable(*common.result_paths(result_name, FLAGS.output_dir, FLAGS.plot))
    import_tensorflow()  # TensorFlow's start-up and C++ INFO lines filtered (see jobs)
    from pneumo_data.prepare import PrepareConfig, prepare
    size, batch = FLAGS.image_size, FLAGS.batch_size
    work = tempfile.mkdtemp(prefix="pneumo-bench-train-step-")
    grid = [(name, precision, jit_flag.lower() == "true", stem)
            for name in FLAGS.models for precision in FLAGS.precisions
            for jit_flag in FLAGS.jit
            for stem in (FLAGS.stems if name == "bn_cnn" else [None])]
    measured = {key: [] for key in grid}
    try:
        prepare(PrepareConfig(source_dir=source_dir, output_dir=work, progress=False))
        for _ in range(FLAGS.rounds):
            for key in grid:
                name, precision, jit, stem = key
                try:
                    cell = run_cell(name, precision, jit, work, size, batch, FLAGS, stem)
                except Exception as error:  # recorded, not hidden: a cell can fail alone
                    cell = {"model": name, "precision": precision, "jit_compile": jit,
                            "error": f"{type(error).__name__}: {error}"[:500]}
                    if stem:
                        cell["stem"] = stem
                cell["note"] = _note(precision)
                cell["loadavg"] = _loadavg()
                measured[key].append(cell)
                print(_cell_line(cell), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cells = [_merge(measured[key]) for key in grid]
    _relative(cells)

    rows = []
    for c in cells:
        label = c["model"] + (f" ({c['stem']} stem)" if "stem" in c else "")
        if "error" in c:
            rows.append([label, c["precision"], c["jit_compile"], "failed", "", "", "", "",
                         c["error"][:80]])
            continue
        pipe = c.get("pipeline", {}).get("median")
        ratio = c.get("memory_vs_first_stem")
        rows.append([label, c["precision"], "on" if c["jit_compile"] else "off",
                     c["memory"]["median"], f"x{ratio:.2f}" if ratio else "",
                     pipe if pipe is not None else "",
                     f"{c['pipeline_over_memory']:.0%}" if pipe else "",
                     ("yes" if c["input_kept_up"] else "no") if pipe else "", c["note"]])
    table = common.markdown_table(
        ["model", "precision", "XLA", "img/s from memory", "vs first stem (same rounds)",
         "img/s from pipeline", "pipeline / memory", "input kept up (within 5%)", "note"], rows)
    loads = [r["loadavg"] for c in cells for r in c.get("rounds", []) if r.get("loadavg")]
    table += (f"\n\n{size}x{size}, batch {batch}, median of {FLAGS.repeats} windows of "
              f"{FLAGS.steps} steps after {FLAGS.warmup_steps} warm-up steps, median over "
              f"{FLAGS.rounds} round(s) of the whole grid; weights random (speed does "
              f"not depend on them); backbones frozen as in training. CPU: "
              f"{common.machine_line()}"
              + (f"; load average {min(loads):.1f}-{max(loads):.1f} while measuring"
                 if loads else "") + ".")
    path = common.write_results(result_name, FLAGS.output_dir, {
        "environment": common.environment(), "source_dir": source_dir, "image_size": size,
        "batch_size": batch, "steps": FLAGS.steps, "repeats": FLAGS.repeats, "cells": cells},
        table)
    if FLAGS.plot:
        values = {f"{c['model']}{' ' + c['stem'] if 'stem' in c else ''} {c['precision']} "
                  f"XLA {'on' if c['jit_compile'] else 'off'}":
                  c["memory"]["median"] for c in cells if "memory" in c}
        common.bar_chart(path.with_suffix(".png"), values, "training images/s (from memory)",
                         f"Training throughput, {size}x{size}, batch {batch}")


if __name__ == "__main__":
    common.run(main)
