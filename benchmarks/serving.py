r"""Serving routes side by side: accuracy on a split, single-image latency, batch throughput.

    python -m pneumo_eval.evaluate --model_dir=runs/cnn --output_dir=reports/cnn
    python -m pneumo_models.export --model_dir=runs/cnn \
        --threshold_from=reports/cnn/report.json --litert=float32,float16,int8
    python -m benchmarks.serving --model_dir=runs/cnn --split=test

Routes, all in this process, all fed the split's *stored* images (uint8 [S, S, 1], as the
prepared data holds them) except ``SavedModel bytes``, which gets the original files' bytes
(read from the manifest's source folder):

* ``Keras``: ``model.keras`` as trained (its own precision), stage (b) in front, run as
  ``pneumo_eval.evaluate`` and ``predict`` run it (:func:`pneumo_models.models.predictor`).
* ``Keras float32``: the same weights in float32 (what the LiteRT files are converted from;
  the same as ``Keras`` for a float32 model).
* ``SavedModel pixels`` / ``SavedModel bytes``: ``MODEL_DIR/export/saved_model``'s
  ``serve_pixels`` and ``serving_default`` signatures.
* ``LiteRT <variant>``: each ``MODEL_DIR/export/litert/*.tflite`` with ``ai_edge_litert``
  (--litert_threads threads).

Accuracy: ROC AUC, sensitivity and specificity at the SavedModel's threshold, the AUC
difference from ``Keras`` (the issue asks int8 to stay within 0.01), the largest probability
difference from ``Keras`` and the decisions that flip. Latency: p50/p95 of --latency_runs
single-image calls after --warmup untimed ones; throughput: images/s of one --batch_size
batch, median of --repeats. Timings on a shared CPU are preliminary: compare routes within one
run, on an idle machine.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from absl import flags

from benchmarks import common
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.manifest import load_manifest
from pneumo_eval.metrics import binary_metrics
from pneumo_models.edge import LiteRTModel
from pneumo_models.export_meta import LITERT_META, load_litert_meta, load_serving_meta, model_size
from pneumo_models.rundir import RunDir

flags.DEFINE_string("model_dir", None, "A model_dir exported by python -m pneumo_models.export "
                                       "(export/saved_model, export/litert).")
flags.DEFINE_string("data_dir", None, "Prepared data (default: run.json's).")
flags.DEFINE_string("split", "test", "Split to score.")
flags.DEFINE_integer("limit", 0, "Score at most this many images of the split (0: all).")
flags.DEFINE_integer("latency_runs", 200, "Single-image calls per route.")
flags.DEFINE_integer("warmup", 10, "Untimed calls first.")
flags.DEFINE_integer("batch_size", 32, "Batch size for throughput.")
flags.DEFINE_integer("repeats", 5, "Timed batches per route.")
flags.DEFINE_integer("litert_threads", 2, "LiteRT interpreter threads.")
flags.DEFINE_string("output_dir", None, "Results folder (default benchmarks/results).")
flags.DEFINE_string("name", None, "Result file name (default serving-<model dir name>).")
FLAGS = flags.FLAGS


def _latency(call, inputs, runs: int, warmup: int) -> dict:
    for i in range(warmup):
        call(inputs[i % len(inputs)])
    times = []
    for i in range(runs):
        start = time.perf_counter()
        call(inputs[i % len(inputs)])
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))],
            "runs": runs}


def _throughput(call, batch, repeats: int) -> dict:
    call(batch)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(batch)
        rates.append(len(batch) / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "batch": len(batch), "repeats": repeats}


def main(argv):
    del argv
    run = RunDir(FLAGS.model_dir)  # the checks first: a refusal does not wait for TensorFlow
    model_dir = run.path
    name = FLAGS.name or f"serving-{model_dir.name}"
    common.check_writable(*common.result_paths(name, FLAGS.output_dir))  # before measuring
    data_dir = FLAGS.data_dir or run.data_dir()
    m = load_manifest(data_dir)
    spec = m.preprocess
    saved_model = run.saved_model_path
    meta = load_serving_meta(saved_model)

    tf = import_tensorflow()  # the benchmark's TensorFlow half: loaded here, once
    from pneumo_data.preprocess.model_input_tf import to_model_input
    from pneumo_data.reader import eval_dataset
    from pneumo_models.litert import float32_copy
    from pneumo_models.models import load_model, predictor

    threshold = meta["threshold"]
    model = load_model(run.model_path)
    size = model_size(model)

    stored, labels, sources = [], [], []
    for x, y, md in eval_dataset(data_dir, FLAGS.split, image_size=spec.stored_size,
                                 with_metadata=True):
        stored.append(x.numpy())
        labels.append(y.numpy()[:, 0])
        sources += [s.decode() for s in md["source_path"].numpy()]
    stored, labels = np.concatenate(stored), np.concatenate(labels)
    if FLAGS.limit:
        stored, labels, sources = stored[:FLAGS.limit], labels[:FLAGS.limit], \
            sources[:FLAGS.limit]
    source_dir = Path(m.data["source"]["dir"])
    file_bytes = [(source_dir / s).read_bytes() for s in sources]

    def keras_route(net):
        score = predictor(net)  # graph execution, as evaluate and predict run it
        return lambda x: score(to_model_input(x, size))

    loaded = tf.saved_model.load(str(saved_model))
    pixels_sig = loaded.signatures["serve_pixels"]
    bytes_sig = loaded.signatures["serving_default"]
    routes = {
        "Keras": (keras_route(model), stored),
        "Keras float32": (keras_route(float32_copy(model)), stored),
        "SavedModel pixels": (lambda x: pixels_sig(pixels=tf.constant(x))["probability"]
                              .numpy(), stored),
        "SavedModel bytes": (lambda b: bytes_sig(images=tf.constant(b))["probability"].numpy(),
                             file_bytes),
    }
    file_sizes = {}
    litert_meta = None
    litert_dir = run.litert_path
    for path in sorted(litert_dir.glob("*.tflite")):
        edge = LiteRTModel(path, num_threads=FLAGS.litert_threads)
        routes[f"LiteRT {path.stem}"] = (lambda x, e=edge: e.predict(x, batch_size=len(x)),
                                         stored)
        file_sizes[f"LiteRT {path.stem}"] = path.stat().st_size
    if (litert_dir / LITERT_META).exists():
        litert_meta = load_litert_meta(litert_dir / LITERT_META)

    results, reference = {}, None
    for route, (call, inputs) in routes.items():
        scores = np.concatenate([call(inputs[i:i + 64]) for i in range(0, len(inputs), 64)])
        scores = scores.astype(np.float64)
        reference = scores if reference is None else reference
        metrics = binary_metrics(labels, scores, threshold)
        singles = [inputs[i:i + 1] for i in range(min(len(inputs), 64))]
        results[route] = {
            "roc_auc": metrics["roc_auc"], "sensitivity": metrics["sensitivity"],
            "specificity": metrics["specificity"], "accuracy": metrics["accuracy"],
            "max_abs_diff_vs_keras": float(np.abs(scores - reference).max()),
            "flips_vs_keras": int(((scores >= threshold) != (reference >= threshold)).sum()),
            "file_bytes": file_sizes.get(route),
            "latency": _latency(call, singles, FLAGS.latency_runs, FLAGS.warmup),
            "throughput": _throughput(call, inputs[:FLAGS.batch_size], FLAGS.repeats),
        }
    keras_auc = results["Keras"]["roc_auc"]
    rows = []
    for route, r in results.items():
        r["roc_auc_minus_keras"] = r["roc_auc"] - keras_auc
        rows.append([route, "" if r["file_bytes"] is None else f"{r['file_bytes'] / 1e6:.1f} MB",
                     f"{r['roc_auc']:.4f}", f"{r['roc_auc_minus_keras']:+.4f}",
                     f"{r['sensitivity']:.3f}", f"{r['specificity']:.3f}",
                     f"{r['max_abs_diff_vs_keras']:.4f}", r["flips_vs_keras"],
                     f"{r['latency']['p50_ms']:.2f}", f"{r['latency']['p95_ms']:.2f}",
                     f"{r['throughput']['images_per_s']:.0f}"])
    table = common.markdown_table(
        ["route", "file", "ROC AUC", "AUC - Keras", "sensitivity", "specificity",
         "max abs diff vs Keras", "flips", "p50 ms", "p95 ms",
         f"img/s (batch {FLAGS.batch_size})"], rows)
    table += (f"\n\n{len(labels)} `{FLAGS.split}` images of `{data_dir}` "
              f"({int(labels.sum())} pneumonia); threshold {threshold:.4f} "
              f"({meta['threshold_source']}); stored {spec.stored_size} px, model {size} px; "
              f"LiteRT threads {FLAGS.litert_threads}.")
    payload = {"environment": common.environment(), "model_dir": str(model_dir),
               "data_dir": str(data_dir), "split": FLAGS.split, "threshold": threshold,
               "threshold_source": meta["threshold_source"], "images": int(len(labels)),
               "results": results, "litert": litert_meta}
    common.write_results(name, FLAGS.output_dir, payload, table)


if __name__ == "__main__":
    flags.mark_flags_as_required(["model_dir"])
    common.run(main)
