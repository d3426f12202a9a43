r"""Ingest throughput: images/s of pneumo_data.prepare, interpreter start-up excluded.

    python -m benchmarks.prepare --source_dir=../shared/data/chest_xray_fullres
    python -m benchmarks.prepare --dicom            # generated 16-bit 2048x2048 DICOMs

``--dicom`` times DICOM ingest instead: a generated CSV-labelled folder of 16-bit 2048x2048
DICOMs with a window (``--dicom_images`` files) prepared end to end with 1 and 2 decoding
threads, and, per file kind (16-bit windowed, 12-bit MONOCHROME1 without a window, RLE
Lossless, a 16-bit PNG of the same pixels for reference) the writer's decode call alone, plus
the header-only read the planner does per file and a per-stage breakdown of one file.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from absl import app, flags

from benchmarks import common
from pneumo_data.common.config import with_leaves
from pneumo_data.prepare import PrepareConfig, prepare

flags.DEFINE_string("source_dir", None, "Image folder (default: the embedded dataset).")
flags.DEFINE_integer("repeats", 3, "Timed repeats (after one warm-up).")
flags.DEFINE_integer("image_size", 256, "Stored size.")
flags.DEFINE_string("output_dir", None, "Where to write results (default benchmarks/results).")
flags.DEFINE_string("name", None, "Result file name (default from the source folder, or "
                                  "prepare-dicom).")
flags.DEFINE_bool("dicom", False, "Time DICOM ingest on generated 16-bit DICOMs instead.")
flags.DEFINE_integer("dicom_images", 16, "--dicom: files per kind (a 2048x2048 file is 8 MB).")
flags.DEFINE_integer("dicom_side", 2048, "--dicom: side of the generated DICOMs.")
flags.DEFINE_list("threads", ["1", "2"], "--dicom: decoding thread counts to time.")
FLAGS = flags.FLAGS


def _count(m) -> int:
    return sum(sum(c.values()) for c in m.data["counts"].values())


def _time_prepare(config: PrepareConfig) -> dict[str, float]:
    def run():
        out = tempfile.mkdtemp(prefix="pneumo-bench-prepare-")
        try:
            return _count(prepare(with_leaves(config, output_dir=out)))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return common.repeat_timing(run, FLAGS.repeats)


def folders_main():
    from pneumo_data import synthetic
    source_dir = FLAGS.source_dir or str(synthetic.default_dataset_dir())
    results, rows = {}, []
    for workers in (1, 0):
        for fast_jpeg in (False, True):
            timing = _time_prepare(PrepareConfig(
                source_dir=source_dir, image_size=FLAGS.image_size, num_workers=workers,
                fast_jpeg=fast_jpeg, progress=False))
            label = f"threads={workers or 'all cores'}, fast_jpeg={fast_jpeg}"
            results[label] = timing
            rows.append([label, timing["median"], f"{timing['min']:.0f}-{timing['max']:.0f}"])
    table = common.markdown_table(["prepare", "img/s (median)", "range"], rows)
    common.write_results(FLAGS.name or f"prepare-{source_dir.rstrip('/').split('/')[-1]}",
                         FLAGS.output_dir,
                         {"environment": common.environment(), "source_dir": source_dir,
                          "image_size": FLAGS.image_size, "results": results}, table)


def dicom_main():
    from benchmarks import dicom_ingest
    threads = tuple(int(t) for t in FLAGS.threads)
    work = Path(tempfile.mkdtemp(prefix="pneumo-bench-dicom-"))
    try:
        source = dicom_ingest.write_source(work / "source", FLAGS.dicom_images, FLAGS.dicom_side)
        mb = sum(p.stat().st_size for p in (source / "dicom").iterdir()) / 1e6
        prepared, rows = {}, []
        for t in threads:
            timing = _time_prepare(with_leaves(
                PrepareConfig(), source_dir=str(source), image_size=FLAGS.image_size,
                num_workers=t, progress=False, labels_csv="labels.csv", path_column="file",
                label_column="label", val_fraction=0.0, test_fraction=0.0))
            prepared[f"threads={t}"] = timing
            rows.append([f"prepare, 16-bit {FLAGS.dicom_side} px DICOM, threads={t}",
                         timing["median"], f"{timing['min']:.0f}-{timing['max']:.0f}"])
        decode = dicom_ingest.decode_rates(work / "kinds", FLAGS.dicom_images, FLAGS.image_size,
                                           threads, FLAGS.repeats, FLAGS.dicom_side)
        for kind, by_threads in decode.items():
            for key, timing in by_threads.items():
                rows.append([f"{kind}, {key}", timing["median"],
                             f"{timing['min']:.0f}-{timing['max']:.0f}"])
        stages = dicom_ingest.stage_ms(work / "kinds" / "w0.dcm", FLAGS.image_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = common.markdown_table(["DICOM ingest", "img/s (median)", "range"], rows)
    table += "\n\nms per stage, one 16-bit file, one thread (median of 5):\n\n" + \
        common.markdown_table(list(stages), [[f"{v:.1f}" for v in stages.values()]])
    common.write_results(FLAGS.name or "prepare-dicom", FLAGS.output_dir,
                         {"environment": common.environment(), "images": FLAGS.dicom_images,
                          "side": FLAGS.dicom_side, "image_size": FLAGS.image_size,
                          "source_mb": round(mb, 1), "prepare": prepared,
                          "decode": decode, "stage_ms": stages}, table)


def main(_):
    import tensorflow  # noqa: F401  (import cost is start-up, not ingest)
    if FLAGS.dicom:
        dicom_main()
    else:
        folders_main()


if __name__ == "__main__":
    app.run(main)
