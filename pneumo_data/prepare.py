r"""Ingest job: a chest X-ray folder becomes verified TFRecord shards + manifest.json.

Run it::

    python -m pneumo_data.prepare --source_dir=chest_xray --output_dir=data/xray
    python -m pneumo_data.prepare --output_dir=data/synthetic   # embedded default data
    python -m pneumo_data.prepare --source_dir=rsna --preset=rsna --output_dir=data/rsna
    python -m pneumo_data.prepare --source_dir=export --labels_csv=labels.csv \
        --path_column=file --label_column=finding --positive_values=Pneumonia \
        --output_dir=data/export

or from Python: ``prepare(PrepareConfig(source_dir=..., output_dir=...))``.

Two halves. Planning (:mod:`pneumo_data.plan`): find files, labels, patients and
views (:mod:`pneumo_data.sources`: Kaggle folders, CSV-labelled collections, the rsna /
nih / chexpert presets; options in :class:`pneumo_data.sources.SourceConfig`), hash
them, group by patient id and identical content and split (:mod:`pneumo_data.split`),
fix the writing order. Writing (:mod:`pneumo_data.shard_writer`): decode each file once to
grayscale at the stored size in parallel threads (:func:`pneumo_data.preprocess.decode`, DICOM
included), write one shard set per split x class (:mod:`pneumo_data.records`) and finally the
manifest
(:mod:`pneumo_data.manifest`), which lists every source file as written or
skipped with its reason, and every entry of the source folder it ignored: for CSV sources
also every file it did not use (dropped, unlabelled, conflicting labels) and every label-table
row that labelled no file (``label_rows``: merged, duplicate, dropped, missing file,
conflicting). Just before the manifest, TFDS metadata derived from it
(:mod:`pneumo_data.tfds.metadata`), so ``tfds.builder_from_directory`` reads the
folder. ``--runner=beam`` writes the same shards with an Apache Beam pipeline
(:mod:`pneumo_data.beam_writer`) instead of threads.

The output folder is written under an exclusive lock and a ledger of the
files this job wrote (:mod:`pneumo_data.common.outputs`): a second prepare
on the same folder stops at once, a folder holding anyone else's files is
refused, and ``--overwrite`` replaces only what prepare wrote.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pneumo_data import __version__, beam_writer, manifest, sources, synthetic
from pneumo_data.common.config import config_to_dict, group, option
from pneumo_data.common.errors import UserError
from pneumo_data.common.files import file_sha256
from pneumo_data.common.jobs import import_tensorflow, show_progress
from pneumo_data.common.outputs import OutputDir
from pneumo_data.plan import Plan, make_plan, source_fingerprint
from pneumo_data.preprocess import DEFAULT_MAX_PIXELS, RESIZE_MODES, PreprocessSpec
from pneumo_data.records import ENCODINGS

log = logging.getLogger("pneumo.prepare")

__all__ = ["PrepareConfig", "prepare", "PrepareError"]


class PrepareError(UserError):
    """The job cannot run with these inputs or options; the message says why."""


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Options of the ingest job; each field is also a command-line flag."""

    output_dir: str | None = option(None, "Folder for the shards and manifest.json (required).")
    source_dir: str | None = option(
        None, "Image folder (Kaggle chest_xray layout, NORMAL/PNEUMONIA folders, an "
              "rsna/nih/chexpert download, or any folder with --labels_csv). Empty: the "
              "embedded default (generated) dataset.")
    resplit: str = option(
        "official", "official: keep the source's test split, re-split train+val by patient; "
                    "all: pool everything and split train/val/test by patient.",
        choices=("official", "all"))
    val_fraction: float = option(0.15, "Fraction of the pooled images that go to val.")
    test_fraction: float = option(
        0.15, "Fraction that goes to test when splitting everything (--resplit=all, or a "
              "source without official splits).")
    seed: int = option(0, "Seed of the split and the shard order.")
    patient_id_regex: str = option(
        sources.DEFAULT_PATIENT_ID_REGEX,
        "Regex applied to the file name (kaggle layout; for CSV sources, when changed, to "
        "the file's path); its first group (or the whole match) is the patient id. Files "
        "without a match are their own patient.")
    image_size: int = option(256, "Side of the stored square grayscale images.")
    resize: str = option("stretch", "stretch to square (as ImageDataGenerator) or pad "
                                    "(keep aspect ratio).", choices=RESIZE_MODES)
    encoding: str = option("raw", "Stored image encoding.", choices=ENCODINGS)
    jpeg_quality: int = option(95, "JPEG quality when --encoding=jpeg.")
    shard_mb: float = option(64.0, "Target shard size in MB (at least one shard per class).")
    max_pixels: int = option(DEFAULT_MAX_PIXELS,
                             "Skip images with more pixels (decompression bomb guard; this "
                             "limit governs, Pillow's own does not apply).")
    fast_jpeg: bool = option(True, "Decode large JPEGs at a reduced DCT scale before resizing.")
    allow_leakage: bool = option(
        False, "Write even if a patient or identical image ends up in two splits.")
    overwrite: bool = option(
        False, "Replace an output this job wrote earlier with other options or sources (only "
               "prepare's own files are ever deleted).")
    num_workers: int = option(0, "Decoding threads (0: one per core).")
    runner: str = option(
        "threads", "threads: decode and write in this process's threads; beam: run decoding "
                   "and shard writing as an Apache Beam pipeline (pip install 'pneumo[beam]'; "
                   "same shards, byte for byte).", choices=("threads", "beam"))
    beam_pipeline_options: str = option(
        "", "Beam pipeline flags with --runner=beam, e.g. '--runner=FlinkRunner "
            "--flink_master=host:8081' (empty: local, one worker process per core).")
    progress: bool = option(True, "Show a progress bar.")
    source: sources.SourceConfig = group(sources.SourceConfig,
                                         "Where labels, patients and views come from.")

    def identity(self) -> dict[str, Any]:
        """The options that determine the output (a re-run with equal ones is a no-op)."""
        values = config_to_dict(self)
        for key in ("output_dir", "overwrite", "num_workers", "runner", "beam_pipeline_options",
                    "progress"):
            values.pop(key)
        return values

    def validate(self) -> None:
        if not self.output_dir:
            raise PrepareError("--output_dir is required")
        if self.image_size < 8:
            raise PrepareError(f"image_size must be at least 8, got {self.image_size}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise PrepareError(f"{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1:
            raise PrepareError("val_fraction + test_fraction must be below 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise PrepareError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.shard_mb <= 0 or self.max_pixels <= 0 or self.num_workers < 0:
            raise PrepareError("shard_mb and max_pixels must be positive, num_workers >= 0")
        if self.beam_pipeline_options and self.runner != "beam":
            raise PrepareError("--beam_pipeline_options needs --runner=beam")
        self.preprocess_spec()  # the stage (a) settings are valid

    def preprocess_spec(self) -> PreprocessSpec:
        """The stage (a) settings of :mod:`pneumo_data.preprocess` these options give."""
        return PreprocessSpec(stored_size=self.image_size, resize=self.resize,
                              fast_jpeg=self.fast_jpeg, max_pixels=self.max_pixels)


def _progress(enabled: bool):
    """``wrap(iterable, total, description)``: a tqdm bar, or the iterable itself. Bars are
    drawn only when asked (``--progress``), on a terminal, and not with ``--verbosity=-1``."""
    enabled = enabled and show_progress()

    def wrap(iterable, total: int, desc: str):
        if not enabled:
            return iterable
        return tqdm(iterable, total=total, desc=desc, unit="img", dynamic_ncols=True)
    return wrap


# ---------------------------------------------------------------- output state

def _up_to_date(out: OutputDir, config: PrepareConfig, fingerprint: str
                ) -> tuple[manifest.Manifest | None, str | None]:
    """(the existing manifest, None) when it is complete and matches, else (None, why not).

    "Complete" means what readers check: every shard present with its recorded size and
    sha256.
    """
    if not (out.path / manifest.MANIFEST_NAME).exists():
        return None, None
    try:
        existing = manifest.load_manifest(out.path)
    except manifest.ManifestError as error:
        return None, f"its manifest is damaged ({error})"
    if (existing.data["options"] != config.identity()
            or existing.data["source"].get("fingerprint") != fingerprint):
        return None, "it was prepared with other options or from other source files"
    try:
        existing.verify(checksums=True)
    except manifest.ShardIntegrityError as error:
        return None, f"the existing output is damaged ({error})"
    return existing, None


def _clear_previous(out: OutputDir, config: PrepareConfig, stale_reason: str | None) -> None:
    """Removes what an earlier run of this job left: always its unfinished leftovers, a
    finished output only with --overwrite."""
    if stale_reason is None:
        removed = out.clear()
        if removed:
            log.warning("removing %d file(s) this job left unfinished in %s", len(removed),
                        out.path)
        return
    if not config.overwrite:
        raise PrepareError(
            f"{out.path} already holds a prepared dataset, but {stale_reason}. "
            f"Pass --overwrite to replace it (only the files prepare wrote are deleted), or "
            f"choose another --output_dir.")
    log.info("overwriting the dataset prepare wrote in %s", out.path)
    out.remove(manifest.MANIFEST_NAME)  # first: never a manifest over missing shards
    out.clear()


def _summary_table(data: dict[str, Any], seconds: float) -> str:
    lines = [f"{'split':<8}{'normal':>10}{'pneumonia':>11}{'total':>9}{'shards':>8}"]
    for split_name, by_class in data["counts"].items():
        n_shards = sum(len(v) for v in data["shards"][split_name].values())
        lines.append(f"{split_name:<8}{by_class.get('normal', 0):>10}"
                     f"{by_class.get('pneumonia', 0):>11}{sum(by_class.values()):>9}"
                     f"{n_shards:>8}")
    written = sum(sum(c.values()) for c in data["counts"].values())
    lines.append(f"written {written} of {len(data['files'])} files in {seconds:.1f}s "
                 f"({written / max(seconds, 1e-9):.0f} img/s, hashing and decoding)")
    for reason, n in data["skipped"].items():
        lines.append(f"skipped {n}: {reason}")
    summary = data["source"]["label_summary"]
    if summary["rows"]:
        rows = summary["rows"]
        lines.append(f"label rows: {sum(rows.values())} = " + " + ".join(
            f"{n} {status}" for status, n in sorted(rows.items(), key=lambda kv: -kv[1])))
    for value, by_outcome in (data["source"].get("label_values") or {}).items():
        lines.append(f"label value {value!r}: " + ", ".join(
            f"{n} {outcome}" for outcome, n in by_outcome.items()))
    unused = {k: v for k, v in summary["files"].items() if k not in ("labelled", "ignored")}
    for status, n in sorted(unused.items()):
        lines.append(f"not used {n}: {status} (listed in the manifest's files)")
    if data["source"]["views"]:
        views = collections.Counter()
        for by_view in data["source"]["views"].values():
            views.update(by_view)
        lines.append("views written: " + ", ".join(f"{v} {n}" for v, n in views.most_common()))
    if data["ignored"]:
        lines.append(f"ignored {len(data['ignored'])} entr(ies) that are not sources "
                     f"(listed in the manifest under 'ignored')")
    dup = data["duplicates"]
    lines.append(f"identical files: {len(dup['within_split'])} group(s) within a split, "
                 f"{len(dup['across_splits'])} across splits, "
                 f"{len(dup['across_classes'])} across classes (skipped)")
    return "\n".join(lines)


def _check_counts(counts: dict[str, dict[str, int]], plan: Plan, written: bool) -> None:
    """Refuses a plan (before writing) or a written output (after decoding) whose train split
    lacks a class, naming why its files were skipped; warns for other splits."""
    for split_name in plan.split_names:
        missing = [label for label in sources.CLASSES if counts[split_name][label] == 0]
        if missing and split_name == "train":
            raise PrepareError(
                f"the train split has no {', '.join(missing)} images"
                f"{' after decoding' if written else ''}: {_why_missing(plan, missing)}; "
                f"nothing usable to train on")
        if missing and written:
            log.warning("split %s has no %s images: too few patients for the requested "
                        "fractions; training and evaluation need both classes there",
                        split_name, " or ".join(missing))


def _why_missing(plan: Plan, labels: list[str]) -> str:
    """What became of the files of ``labels``: the skip reasons, most frequent first."""
    reasons = collections.Counter(e.reason.split(":")[0] for e in plan.entries
                                  if e.source.label in labels and e.status == "skipped")
    if not reasons:
        return f"the source has no {' or '.join(labels)} files for it"
    shown = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common(3))
    top = reasons.most_common(1)[0][0]
    example = next(e for e in plan.entries if e.source.label in labels
                   and e.status == "skipped" and e.reason.split(":")[0] == top)
    return f"its files were skipped ({shown}), e.g. {example.source.relpath}: {example.reason}"


def dataset_name(config: PrepareConfig, preset: str) -> str:
    """--dataset_name, else the preset's name (rsna, nih, chexpert), else the folder's."""
    if config.source.dataset_name:
        return config.source.dataset_name
    if preset in ("rsna", "nih", "chexpert"):
        return preset
    return Path(config.source_dir).name


def _label_rule(scan: sources.SourceScan) -> str:
    options = scan.label_options or {}
    return (f"{options.get('label_column')} in {options.get('positive_values')} is pneumonia, "
            f"{options.get('negative_values') or 'everything else'} is not")


def _relative(path: Path, source_dir: str) -> str:
    return os.path.relpath(path, source_dir) if path.is_relative_to(source_dir) else str(path)


def _view_counts(entries) -> dict[str, dict[str, int]]:
    """Written images per split and view (empty when the source records no views)."""
    counts: dict[str, collections.Counter] = {}
    for e in entries:
        if e.status == "written" and e.source.view is not None:
            counts.setdefault(e.split, collections.Counter())[e.source.view] += 1
    return {split: dict(sorted(c.items())) for split, c in sorted(counts.items())}


def _writing_modules():
    """The job's TensorFlow half (TensorFlow takes about 10 s to load): the one place prepare
    imports it, once the options, the sources and the output folder have been checked."""
    import_tensorflow()
    from pneumo_data import shard_writer
    from pneumo_data.tfds import metadata
    return shard_writer, metadata


def prepare(config: PrepareConfig) -> manifest.Manifest:
    """Runs the ingest job; returns the manifest of the (possibly existing) output."""
    config.validate()
    if config.runner == "beam":  # without apache-beam: a clear error now, not after hashing
        beam_writer.pipeline_options(config.beam_pipeline_options)
    if config.source_dir is None:
        config = dataclasses.replace(config, source_dir=str(synthetic.default_dataset_dir()))
        log.info("no --source_dir: using the embedded default dataset at %s", config.source_dir)
    config = dataclasses.replace(config, source_dir=str(Path(config.source_dir).resolve()))
    try:
        scan = sources.scan(config.source_dir, config.source, config.patient_id_regex)
    except OSError as error:
        raise PrepareError(f"cannot read {config.source_dir}: {error}") from None
    present = {f.label for f in scan.files if f.skip_reason is None}
    if len(present) < 2:
        need = ("both NORMAL and PNEUMONIA folders with images are needed"
                if scan.preset == "kaggle" else
                f"both labels are needed (label rule: {_label_rule(scan)})")
        raise PrepareError(f"{config.source_dir}: only class {sorted(present)} has files; "
                           f"{need}")
    if Path(config.output_dir).resolve().is_relative_to(Path(config.source_dir)):
        raise PrepareError(f"--output_dir {config.output_dir} is inside --source_dir; "
                           f"choose a folder outside the images")
    for item in scan.ignored:
        if not item.reason.startswith(("hidden", "label table", "split list")):
            log.warning("ignored %s: %s", item.relpath, item.reason)
    for warning in scan.label_warnings:
        log.warning("%s", warning)
    fingerprint = source_fingerprint(scan)
    with OutputDir(config.output_dir, job="prepare") as out:
        existing, stale = _up_to_date(out, config, fingerprint)
        if existing is not None:
            log.info("%s is up to date (same options, same source files, shards verified): "
                     "nothing to do", out.path)
            _, tfds_metadata = _writing_modules()
            tfds_metadata.ensure_tfds_metadata(out, existing)  # missing or stale: rewritten
            return existing
        _clear_previous(out, config, stale)
        return _prepare_into(out, config, scan, fingerprint, __version__)


def _prepare_into(out: OutputDir, config: PrepareConfig, scan: sources.SourceScan,
                  fingerprint: str, version: str) -> manifest.Manifest:
    shard_writer, tfds_metadata = _writing_modules()  # before the clock and the bars start
    start = time.perf_counter()
    workers = config.num_workers or os.cpu_count() or 1
    plan = make_plan(scan, config, workers, _progress(config.progress), log)
    _check_counts(plan.planned_counts(), plan, written=False)  # before any shard is written
    if config.runner == "beam":
        shard_table, counts = beam_writer.write_shards(plan, out, config)
    else:
        total = sum(len(g.entries) for g in plan.groups)
        bar = tqdm(total=total, desc="decoding", unit="img", dynamic_ncols=True) \
            if config.progress and show_progress() else None
        shard_table, counts = shard_writer.write_shards(plan, out, config, workers, bar)
        if bar is not None:
            bar.close()
    try:
        _check_counts(counts, plan, written=True)
    except PrepareError:
        out.clear()  # this run's shards: an output that cannot be used is not left behind
        raise
    seconds = time.perf_counter() - start
    data = manifest_data(config, scan, fingerprint, plan, shard_table, counts, seconds, version)
    tfds_metadata.write_tfds_metadata(out, data)  # derived from the manifest, written before it
    manifest.write_manifest(out, data)
    print(_summary_table(data, seconds), flush=True)
    return manifest.load_manifest(out.path)


def manifest_data(config: PrepareConfig, scan: sources.SourceScan, fingerprint: str,
                  plan: Plan, shard_table: dict, counts: dict, seconds: float,
                  version: str) -> dict[str, Any]:
    """The manifest of a written plan (also what the TFDS builder writes beside its shards)."""
    entries = plan.entries
    skipped = collections.Counter(e.reason.split(":")[0] for e in entries if e.status == "skipped")
    data = {
        "format": manifest.FORMAT,
        "format_version": manifest.FORMAT_VERSION,
        "library_version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": config.identity(),
        "source": {"dir": config.source_dir, "files": len(scan.files),
                   "fingerprint": fingerprint,
                   "official_splits": sorted({f.official_split or "none" for f in scan.files}),
                   "split_mode": plan.mode,
                   "preset": scan.preset,
                   "dataset_name": dataset_name(config, scan.preset),
                   "label_options": scan.label_options,
                   "label_summary": scan.summary(),
                   "label_values": scan.label_values,
                   "label_warnings": list(scan.label_warnings),
                   "inputs": [{"path": _relative(p, config.source_dir), "sha256": file_sha256(p)}
                              for p in scan.inputs],
                   "views": _view_counts(entries)},
        "image": {"size": config.image_size, "channels": 1, "dtype": "uint8",
                  "encoding": config.encoding, "resize": config.resize},
        "preprocess": config.preprocess_spec().to_dict(),
        "classes": list(sources.CLASSES),
        "counts": counts,
        "shards": shard_table,
        "skipped": dict(skipped.most_common()),
        "ignored": [{"path": i.relpath, "reason": i.reason} for i in plan.ignored],
        "duplicates": plan.duplicates(),
        "leakage_allowed": plan.leakage,
        "seconds": round(seconds, 2),
        "files": sorted([e.row() for e in entries] + [u.row() for u in scan.unused],
                        key=lambda row: row["path"]),
        "label_rows": [r.to_dict() for r in scan.rows if r.status != "labelled"],
    }
    return data


if __name__ == "__main__":
    from pneumo_data.common.jobs import run_job

    run_job("prepare", PrepareConfig, prepare)
