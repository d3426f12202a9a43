r"""Stored-encoding choice: size, encode speed and tf.data decode speed per encoding.

    python -m benchmarks.encoding --source_dir=../shared/data/chest_xray_224
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

from benchmarks import common
from pneumo_data import sources
from pneumo_data.common.errors import UserError
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.preprocess import PreprocessSpec, decode
from pneumo_data.records import ENCODINGS, encode_image

flags.DEFINE_string("source_dir", None, "Image folder (default: the embedded dataset).")
flags.DEFINE_integer("images", 400, "How many images to sample.")
flags.DEFINE_integer("image_size", 256, "Stored size.")
flags.DEFINE_string("output_dir", None, "Where to write results (default benchmarks/results).")
flags.DEFINE_string("name", "encoding", "Result file name.")
FLAGS = flags.FLAGS


def main(_):
    if FLAGS.images < 1:
        raise UserError(f"--images must be at least 1, got {FLAGS.images}")
    source_dir = common.source_dir(FLAGS.source_dir)  # refused before TensorFlow loads
    common.check_writable(*common.result_paths(FLAGS.name, FLAGS.output_dir))
    tf = import_tensorflow()  # the benchmark's TensorFlow half: loaded here, once
    from pneumo_data.records_tf import decode_image

    found = [f for f in sources.find_sources(source_dir) if f.skip_reason is None]
    step = max(1, len(found) // FLAGS.images)
    size = FLAGS.image_size
    arrays = [decode(f.path, PreprocessSpec(size)).pixels for f in found[::step]]
    arrays = arrays[: FLAGS.images]
    rows, results = [], {}
    for encoding in ENCODINGS:
        start = time.perf_counter()
        blobs = [encode_image(a, encoding) for a in arrays]
        encode_rate = len(blobs) / (time.perf_counter() - start)

        def parse(blob, encoding=encoding):
            return decode_image(blob, encoding, size)

        ds = tf.data.Dataset.from_tensor_slices(blobs).repeat(5).map(parse, num_parallel_calls=2)
        timing = common.repeat_timing(lambda ds=ds: sum(1 for _ in ds), repeats=3)
        error = float(np.mean([np.abs(parse(b).numpy()[..., 0].astype(int) - a).mean()
                               for a, b in zip(arrays, blobs)]))
        kib = float(np.mean([len(b) for b in blobs]) / 1024)
        results[encoding] = {"mean_kib": kib, "encode_img_s": encode_rate,
                             "decode_img_s": timing, "mean_abs_error": error}
        rows.append([encoding, kib, encode_rate, timing["median"], error])
    table = common.markdown_table(
        ["encoding", "KiB / image", "encode img/s", "tf.data decode img/s (median)",
         "mean abs error (grey levels)"], rows)
    common.write_results(FLAGS.name, FLAGS.output_dir, {
        "environment": common.environment(), "source_dir": source_dir,
        "images": len(arrays), "image_size": size, "results": results}, table)


if __name__ == "__main__":
    common.run(main)
