r"""Ingest throughput: images/s of pneumo_data.prepare, interpreter start-up excluded.

    python -m benchmarks.prepare --source_dir=../shared/data/chest_xray_fullres
    python -m benchmarks.prepare --dicom            # generated 16-bit 2048x2048 DICOMs
    python -m benchmarks.prepare --runners=threads,beam:1,beam:2   # threads vs Beam

``--dicom`` times DICOM ingest instead: a generated CSV-labelled folder of 16-bit 2048x2048
DICOMs with a window (``--dicom_images`` files) prepared end to end with 1 and 2 decoding
threads, and, per file kind (16-bit windowed, 12-bit MONOCHROME1 without a window, RLE
Lossless, a 16-bit PNG of the same pixels for reference) the writer's decode call alone, plus
the header-only read the planner does per file and a per-stage breakdown of one file.

Threads against Apache Beam (needs apache-beam, the ``beam`` extra; here it lives in its
own virtualenv)::

    nice -n 10 /work/venvs/beam/bin/python -m benchmarks.prepare \
        --source_dir=../shared/data/chest_xray_fullres --runners=threads,beam:1,beam:2

``--runners`` times prepare's writing stage only (read, decode, encode, serialize, write
the shards) on one plan computed up front: finding, hashing and splitting the files are
the same for every runner and not timed. ``threads`` is prepare's threaded writer (one
thread per core); ``beam:N`` is the Beam writer (``prepare --runner=beam``) on Beam's
local Python runner (FnApiRunner, what the DirectRunner runs batch pipelines on) with N
worker processes, worker start-up included; ``beam-startup:N`` is the same pipeline on
one file per class, i.e. Beam's fixed cost. Every run's shards are checked against the
first runner's (file names and sha256s).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from absl import flags

from benchmarks import common, dicom_ingest
from pneumo_data import beam_writer, sources
from pneumo_data.common.config import with_leaves
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.common.outputs import OutputDir
from pneumo_data.plan import ShardGroup, make_plan
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
flags.DEFINE_list("runners", [], "Compare writers on one plan: threads, beam:N, "
                                 "beam-startup:N (N worker processes; see the module docstring).")
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
    source_dir = common.source_dir(FLAGS.source_dir)
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


def _plan(config: PrepareConfig):
    scan = sources.scan(config.source_dir, config.source, config.patient_id_regex)
    return make_plan(scan, config, os.cpu_count() or 1, lambda it, total, desc: it,
                     logging.getLogger("benchmarks.prepare"))


def _startup_plan(plan):
    """One file per class of the first split: what Beam costs before any real work."""
    groups = [ShardGroup(g.split, g.label, g.entries[:1], 1) for g in plan.groups[:2]]
    return dataclasses.replace(plan, groups=groups,
                               entries=[e for g in groups for e in g.entries])


def _write_with(runner: str, plan, config: PrepareConfig, out_dir: str) -> dict:
    """Writes ``plan`` with one runner into ``out_dir``; returns the shard table."""
    from pneumo_data import shard_writer  # TensorFlow: loaded by main()
    with OutputDir(out_dir, "prepare") as out:
        if runner == "threads":
            workers = config.num_workers or os.cpu_count() or 1
            return shard_writer.write_shards(plan, out, config, workers)[0]
        kind, _, processes = runner.partition(":")
        if kind not in ("beam", "beam-startup") or not processes.isdigit():
            raise ValueError(f"unknown runner {runner!r}: threads, beam:N or beam-startup:N")
        if kind == "beam-startup":
            plan = _startup_plan(plan)
        options = (f"--runner=FnApiRunner --direct_running_mode=multi_processing "
                   f"--direct_num_workers={int(processes)}")
        beam_config = dataclasses.replace(config, runner="beam", beam_pipeline_options=options)
        return beam_writer.write_shards(plan, out, beam_config)[0]


def compare_runners(source_dir: str, runners: list[str], image_size: int, repeats: int) -> dict:
    """Seconds and img/s of the writing stage per runner on one plan (module docstring)."""
    config = PrepareConfig(source_dir=source_dir, output_dir="(benchmark)",
                           image_size=image_size, progress=False)
    plan = _plan(config)
    reference, results = None, {}
    for runner in runners:
        seconds, images = [], 0
        for attempt in range(repeats + 1):  # the first is a warm-up (page cache, imports)
            fresh = copy.deepcopy(plan)  # writing marks the entries
            out = tempfile.mkdtemp(prefix="pneumo-bench-runners-")
            try:
                start = time.perf_counter()
                table = _write_with(runner, fresh, config, out)
                elapsed = time.perf_counter() - start
            finally:
                shutil.rmtree(out, ignore_errors=True)
            shards = {e["file"]: e["sha256"] for by_class in table.values()
                      for entries in by_class.values() for e in entries}
            images = sum(e["records"] for by_class in table.values()
                         for entries in by_class.values() for e in entries)
            if not runner.startswith("beam-startup"):
                if reference is None:
                    reference = (runner, shards)
                elif shards != reference[1]:
                    raise RuntimeError(f"{runner} wrote other shards than {reference[0]}")
            if attempt:
                seconds.append(elapsed)
        median = statistics.median(seconds)
        results[runner] = {"images": images, "seconds_median": median, "seconds": seconds,
                           "img_per_s": images / median}
    return results


def runners_main():
    source_dir = common.source_dir(FLAGS.source_dir)
    name = FLAGS.name or f"prepare-runners-{source_dir.rstrip('/').split('/')[-1]}"
    common.check_writable(*common.result_paths(name, FLAGS.output_dir))
    results = compare_runners(source_dir, FLAGS.runners, FLAGS.image_size, FLAGS.repeats)
    rows = [[runner, r["images"], r["seconds_median"], r["img_per_s"]]
            for runner, r in results.items()]
    table = common.markdown_table(["writer", "images", "seconds (median)", "img/s"], rows)
    common.write_results(name, FLAGS.output_dir,
                         {"environment": common.environment(), "source_dir": source_dir,
                          "image_size": FLAGS.image_size, "repeats": FLAGS.repeats,
                          "results": results}, table)


def main(_):
    if not FLAGS.dicom:
        common.source_dir(FLAGS.source_dir)  # a missing folder is refused before TensorFlow
    import_tensorflow()  # import cost is start-up, not ingest
    if FLAGS.dicom:
        dicom_main()
    elif FLAGS.runners:
        runners_main()
    else:
        folders_main()


if __name__ == "__main__":
    common.run(main)
