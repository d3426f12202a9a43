r"""Ingest throughput: images/s of pneumo_data.prepare, interpreter start-up excluded.

    python -m benchmarks.prepare --source_dir=../shared/data/chest_xray_fullres
"""

from __future__ import annotations

import shutil
import tempfile

from absl import app, flags

from benchmarks import common
from pneumo_data.prepare import PrepareConfig, prepare

flags.DEFINE_string("source_dir", None, "Image folder (default: the embedded dataset).")
flags.DEFINE_integer("repeats", 3, "Timed repeats (after one warm-up).")
flags.DEFINE_integer("image_size", 256, "Stored size.")
flags.DEFINE_string("output_dir", None, "Where to write results (default benchmarks/results).")
FLAGS = flags.FLAGS


def main(_):
    import tensorflow  # noqa: F401  (import cost is start-up, not ingest)

    from pneumo_data import synthetic
    source_dir = FLAGS.source_dir or str(synthetic.default_dataset_dir())
    results, rows = {}, []
    for workers in (1, 0):
        for fast_jpeg in (False, True):
            def run(workers=workers, fast_jpeg=fast_jpeg):
                out = tempfile.mkdtemp(prefix="pneumo-bench-prepare-")
                try:
                    m = prepare(PrepareConfig(source_dir=source_dir, output_dir=out,
                                              image_size=FLAGS.image_size, num_workers=workers,
                                              fast_jpeg=fast_jpeg, progress=False))
                    return sum(sum(c.values()) for c in m.data["counts"].values())
                finally:
                    shutil.rmtree(out, ignore_errors=True)
            timing = common.repeat_timing(run, FLAGS.repeats)
            label = f"threads={workers or 'all cores'}, fast_jpeg={fast_jpeg}"
            results[label] = timing
            rows.append([label, timing["median"], f"{timing['min']:.0f}-{timing['max']:.0f}"])
    table = common.markdown_table(["prepare", "img/s (median)", "range"], rows)
    common.write_results(f"prepare-{source_dir.rstrip('/').split('/')[-1]}", FLAGS.output_dir,
                         {"environment": common.environment(), "source_dir": source_dir,
                          "image_size": FLAGS.image_size, "results": results}, table)


if __name__ == "__main__":
    app.run(main)
