r"""Does the input keep the accelerator busy? Training images/s per network x precision, fed
three ways through the training job's own loop (:class:`pneumo_models.loop.TrainingLoop`):

    python -m benchmarks.accelerator --data_dir=data/xray          # a prepared folder
    python -m benchmarks.accelerator --models=bn_cnn,vgg16 --precisions=float32,mixed_float16

* ``memory``: one in-memory batch repeated (the step alone: the input costs nothing);
* ``stream``: ``pneumo_data.train_dataset`` (the memory-cached, batch-level stream);
* ``resident``: the train split placed in device memory, drawn inside the step
  (``residency="device"``; a row says why when the set is refused).

Each input runs ``--steps`` steps per call (steps_per_execution, so the host's per-call
dispatch is amortized the same way for all three), ``--warmup`` calls untimed, then
``--windows`` timed calls; the inputs are interleaved round by round (``--rounds``). The
*input wait* is ``1 - rate / memory rate`` of the same round (the memory input is the
no-wait step by construction: same model, same loop, the batch already there), clipped to
[0, 1], median over rounds. Peak device memory is TensorFlow's own peak of the first GPU per
row (``tf.config.experimental.get_memory_info``).

Without a GPU it prints ``no GPU found: timing the CPU``, labels every row with the CPU model
and writes no GPU field at all (no GPU figure that was not measured).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from absl import flags

from benchmarks import common
from pneumo_data.common.errors import UserError

flags.DEFINE_string("data_dir", None, "A prepared folder (default: --source_dir prepared "
                                      "into a temporary folder).")
flags.DEFINE_string("source_dir", None, "Image folder (default: the embedded dataset).")
flags.DEFINE_list("models", ["bn_cnn", "manual_cnn", "vgg16", "resnet50"], "Networks.")
flags.DEFINE_list("precisions", ["auto"], "Dtype policies; auto: float32, and mixed_float16 "
                                          "and mixed_bfloat16 where the device has them.")
flags.DEFINE_list("inputs", ["memory", "stream", "resident"], "Inputs to time.")
flags.DEFINE_string("strategy", "auto", "auto (the job's default), one_device or mirrored "
                                           "(pneumo_models.distribute).")
flags.DEFINE_integer("image_size", 150, "Model input size.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("steps", 20, "Training steps per call (steps_per_execution).")
flags.DEFINE_integer("warmup", 2, "Untimed calls per input and round.")
flags.DEFINE_integer("windows", 3, "Timed calls per input and round.")
flags.DEFINE_integer("rounds", 2, "Interleaved rounds.")
flags.DEFINE_string("output_dir", None, "Results folder (default benchmarks/results).")
flags.DEFINE_string("name", None, "Result file name (default accelerator-<device>).")
FLAGS = flags.FLAGS

INPUTS = ("memory", "stream", "resident")
STRATEGIES = ("auto", "one_device", "mirrored")  # names of pneumo_models.distribute


def precisions(requested: list[str], gpu: bool, capabilities, fast_bf16: bool) -> list[str]:
    """The policies to time: ``auto`` expands to what the device runs natively."""
    if requested != ["auto"]:
        return requested
    if gpu:
        out = ["float32", "mixed_float16"]
        if capabilities and min(capabilities) >= (8, 0):
            out.append("mixed_bfloat16")
        return out
    return ["float32", "mixed_bfloat16"] if fast_bf16 else ["float32"]


def input_wait(rate: float, memory_rate: float) -> float:
    """The share of step time spent waiting for input: 1 - rate / memory rate, in [0, 1]."""
    if memory_rate <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - rate / memory_rate))


class _Row:
    """One network x precision: a model, a loop and its three inputs."""

    def __init__(self, model_name, precision, data_dir, size, batch, steps, strategy):
        import keras
        import numpy as np
        import tensorflow as tf

        import pneumo_data
        from pneumo_data import resident
        from pneumo_data.config import PipelineConfig
        from pneumo_models import models
        from pneumo_models.loop import TrainingLoop
        from pneumo_models.precision import resolve_jit
        keras.backend.clear_session()
        common.reset_gpu_peak()
        jit = resolve_jit("auto")
        self.jit, self.batch, self.steps = jit, batch, steps
        with strategy.scope():
            model = models.build_model(model_name, image_size=size, weights="none",
                                       precision=precision, augment=True, seed=0,
                                       augment_backend="gather" if jit else "fused")
            model.compile(optimizer=keras.optimizers.Adam(1e-3),
                          loss=keras.losses.BinaryCrossentropy(), jit_compile=jit)
        self.loop = TrainingLoop(model, strategy, steps_per_execution=steps, jit_compile=jit)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (batch, size, size, 1)).astype(np.uint8)
        labels = (np.arange(batch) % 2).astype(np.float32)[:, None]

        def memory(ctx):
            b = ctx.get_per_replica_batch_size(batch)
            return tf.data.Dataset.from_tensors((images[:b], labels[:b])).repeat().prefetch(2)

        def stream(ctx):
            return pneumo_data.train_dataset(data_dir, batch_size=batch, image_size=size,
                                             augment="device", seed=0, input_context=ctx)

        self.sources = {"memory": memory, "stream": stream}
        self.refused = None
        config = PipelineConfig(batch_size=batch, image_size=size, residency="device")
        try:
            self.sources["resident"] = resident.resident_train_set(
                data_dir, config, seed=0, strategy=strategy)
        except resident.ResidentRefused as refused:
            self.refused = str(refused)

    def rates(self, name: str, warmup: int, windows: int) -> list[float]:
        """images/s of ``windows`` timed calls after ``warmup`` calls (one fit)."""
        import keras
        stamps = []
        clock = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda b, logs: stamps.append(time.perf_counter()))
        self.loop.fit(self.sources[name], batch_size=self.batch,
                      steps_per_epoch=(warmup + windows) * self.steps, epochs=1,
                      callbacks=[clock])
        return [self.steps * self.batch / (stamps[i] - stamps[i - 1])
                for i in range(warmup, warmup + windows)]


def measure(model_name, precision, data_dir, size, batch, steps, warmup, windows, rounds,
            inputs, strategy) -> dict:
    """One row: per input the rates of every window, their median, and the input wait."""
    row = _Row(model_name, precision, data_dir, size, batch, steps, strategy)
    names = [n for n in inputs if n in row.sources]
    raw = {n: [] for n in names}
    waits = {n: [] for n in names if n != "memory"}
    for _ in range(rounds):
        medians = {}
        for name in names:
            rates = row.rates(name, warmup, windows)
            raw[name] += rates
            medians[name] = statistics.median(rates)
        if "memory" in medians:
            for name in waits:
                waits[name].append(input_wait(medians[name], medians["memory"]))
    out = {"model": model_name, "precision": precision, "jit_compile": row.jit,
           "images_per_second": {n: statistics.median(v) for n, v in raw.items()},
           "windows": raw,
           "input_wait": {n: statistics.median(v) for n, v in waits.items() if v}}
    if row.refused:
        out["resident_refused"] = row.refused
    memory = common.gpu_memory()
    if memory is not None:  # a GPU field only where a GPU was measured
        out["peak_device_memory_bytes"] = int(memory["peak"])
    return out


def main(argv):
    del argv
    for name in FLAGS.inputs:
        if name not in INPUTS:
            raise UserError(f"--inputs: {name!r} is not one of {INPUTS}")
    if FLAGS.strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {STRATEGIES}, got {FLAGS.strategy!r}")
    for flag in ("steps", "windows", "rounds", "batch_size"):
        if getattr(FLAGS, flag) < 1:
            raise UserError(f"--{flag} must be >= 1")
    if FLAGS.warmup < 1:
        raise UserError("--warmup must be >= 1 (the first call traces)")
    if FLAGS.image_size < 32:
        raise UserError(f"--image_size must be at least 32, got {FLAGS.image_size}")
    if FLAGS.data_dir is not None and not (Path(FLAGS.data_dir) / "manifest.json").is_file():
        raise UserError(f"--data_dir {FLAGS.data_dir} holds no manifest.json (run "
                        f"python -m pneumo_data.prepare first, or give --source_dir)")
    source = None if FLAGS.data_dir else common.source_dir(FLAGS.source_dir)
    from pneumo_data.common.jobs import import_tensorflow
    tf = import_tensorflow()
    from pneumo_models import distribute, precision
    strategy = distribute.make_strategy(FLAGS.strategy)
    distribute.per_replica_batch_size(FLAGS.batch_size, strategy)
    gpus = tf.config.list_physical_devices("GPU")
    env = common.environment()
    if gpus:
        device = ", ".join(env["gpus"])
    else:
        env.pop("gpus", None)
        device = common.machine_line()
        print(f"no GPU found: timing the CPU ({device})", flush=True)
    policies = precisions(FLAGS.precisions, bool(gpus), precision.gpu_compute_capabilities(),
                          precision.cpu_has_fast_bf16())
    name = FLAGS.name or f"accelerator-{'gpu' if gpus else 'cpu'}"
    common.check_writable(*common.result_paths(name, FLAGS.output_dir))
    load_before = common.load_average()

    def run_all(data_dir):
        rows = []
        for model_name in FLAGS.models:
            for policy in policies:
                row = measure(model_name, policy, data_dir, FLAGS.image_size, FLAGS.batch_size,
                              FLAGS.steps, FLAGS.warmup, FLAGS.windows, FLAGS.rounds,
                              FLAGS.inputs, strategy)
                row["device"] = device
                rows.append(row)
                rates = ", ".join(f"{k} {v:,.1f} img/s"
                                  for k, v in row["images_per_second"].items())
                waits = ", ".join(f"{k} {v:.1%}" for k, v in row["input_wait"].items())
                print(f"{row['model']} {row['precision']}: {rates}; input wait {waits}",
                      flush=True)
        return rows

    if FLAGS.data_dir:
        rows, images = run_all(FLAGS.data_dir), None
    else:
        with common.prepared_train_folder(source, "pneumo-bench-accelerator-") as (work, m, _):
            rows, images = run_all(work), m.count("train")
    table_rows = []
    for r in rows:
        ips, wait = r["images_per_second"], r["input_wait"]
        cells = [r["device"], r["model"], r["precision"], "on" if r["jit_compile"] else "off"]
        for n in INPUTS:
            cells.append(ips[n] if n in ips else ("refused" if n == "resident" and
                                                  "resident_refused" in r else ""))
        cells += [f"{wait[n]:.0%}" if n in wait else "" for n in ("stream", "resident")]
        if gpus:
            cells.append(f"{r['peak_device_memory_bytes'] / 2 ** 20:,.0f}")
        table_rows.append(cells)
    header = ["device", "network", "precision", "XLA", "img/s from memory", "img/s stream",
              "img/s resident", "input wait, stream", "input wait, resident"]
    if gpus:
        header.append("peak device memory (MB)")
    table = common.markdown_table(header, table_rows)
    refusals = {r["resident_refused"] for r in rows if "resident_refused" in r}
    table += (f"\n\n{FLAGS.image_size}x{FLAGS.image_size}, global batch {FLAGS.batch_size}, "
              f"strategy {FLAGS.strategy} ({strategy.num_replicas_in_sync} replica(s)); "
              f"{FLAGS.steps} steps per call, median of {FLAGS.windows} calls x "
              f"{FLAGS.rounds} interleaved rounds; load {load_before} -> "
              f"{common.load_average()}." + (" Resident set refused: " + "; ".join(refusals)
                                              if refusals else ""))
    common.write_results(name, FLAGS.output_dir, {
        "environment": env, "data_dir": FLAGS.data_dir, "source_dir": source,
        "train_images": images, "image_size": FLAGS.image_size,
        "batch_size": FLAGS.batch_size, "strategy": FLAGS.strategy,
        "replicas": strategy.num_replicas_in_sync, "steps_per_call": FLAGS.steps,
        "rows": rows}, table)


if __name__ == "__main__":
    common.run(main)
