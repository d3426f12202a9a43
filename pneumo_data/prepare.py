r"""Ingest job: a chest X-ray folder becomes verified TFRecord shards + manifest.json.

Run it::

    python -m pneumo_data.prepare --source_dir=chest_xray --output_dir=data/xray
    python -m pneumo_data.prepare --output_dir=data/synthetic   # embedded default data

or from Python: ``prepare(PrepareConfig(source_dir=..., output_dir=...))``.

Steps: find files (:mod:`pneumo_data.sources`), hash them, group by patient id
and identical content and split (:mod:`pneumo_data.split`), decode each file
once to grayscale at the stored size in parallel threads
(:mod:`pneumo_data.decode`), write one shard set per split x class
(:mod:`pneumo_data.shards`) and finally the manifest
(:mod:`pneumo_data.manifest`), which lists every source file as written or
skipped with its reason.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_data import decode, manifest, shards, sources, split
from pneumo_data.flagconfig import config_to_dict, option

log = logging.getLogger("pneumo.prepare")

__all__ = ["PrepareConfig", "prepare", "PrepareError"]


class PrepareError(ValueError):
    """The job cannot run with these inputs or options; the message says why."""


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Options of the ingest job; each field is also a command-line flag."""

    output_dir: str | None = option(None, "Folder for the shards and manifest.json (required).")
    source_dir: str | None = option(
        None, "Image folder (Kaggle chest_xray layout or NORMAL/PNEUMONIA folders). "
              "Empty: the embedded default (generated) dataset.")
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
        "Regex applied to the file name; its first group (or the whole match) is the "
        "patient id. Files without a match are their own patient.")
    image_size: int = option(256, "Side of the stored square grayscale images.")
    resize: str = option("stretch", "stretch to square (as ImageDataGenerator) or pad "
                                    "(keep aspect ratio).", choices=decode.RESIZE_MODES)
    encoding: str = option("raw", "Stored image encoding.", choices=shards.ENCODINGS)
    jpeg_quality: int = option(95, "JPEG quality when --encoding=jpeg.")
    shard_mb: float = option(64.0, "Target shard size in MB (at least one shard per class).")
    max_pixels: int = option(decode.DEFAULT_MAX_PIXELS,
                             "Skip images with more pixels (decompression bomb guard).")
    fast_jpeg: bool = option(True, "Decode large JPEGs at a reduced DCT scale before resizing.")
    allow_leakage: bool = option(
        False, "Write even if a patient or identical image ends up in two splits.")
    overwrite: bool = option(False, "Replace an existing output prepared with other options.")
    num_workers: int = option(0, "Decoding threads (0: one per core).")
    progress: bool = option(True, "Show a progress bar.")

    def identity(self) -> dict[str, Any]:
        """The options that determine the output (a re-run with equal ones is a no-op)."""
        values = config_to_dict(self)
        for key in ("output_dir", "overwrite", "num_workers", "progress"):
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


@dataclasses.dataclass
class _Entry:
    """One source file's fate; becomes one row of manifest['files']."""

    source: sources.SourceFile
    sha256: str | None = None
    split: str | None = None
    status: str = "pending"
    reason: str | None = None
    shard: str | None = None

    def row(self) -> dict[str, Any]:
        s = self.source
        row = {"path": s.relpath, "status": self.status, "label": s.label,
               "subtype": s.subtype, "patient_id": s.patient_id,
               "official_split": s.official_split, "sha256": self.sha256}
        if self.status == "written":
            row.update(split=self.split, shard=self.shard)
        else:
            row["reason"] = self.reason
        return row

    def skip(self, reason: str) -> None:
        self.status, self.reason = "skipped", reason


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="img", dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def _source_fingerprint(found: list[sources.SourceFile]) -> str:
    digest = hashlib.sha256()
    for f in found:
        digest.update(f"{f.relpath}\0{f.path.stat().st_size}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- output state

def _our_files(output_dir: Path) -> list[Path]:
    patterns = (f"*{shards.SHARD_SUFFIX}", f"*{shards.SHARD_SUFFIX}.partial",
                "manifest.partial.json")
    return sorted(p for pattern in patterns for p in output_dir.glob(pattern))


def _existing_output(config: PrepareConfig, fingerprint: str) -> manifest.Manifest | None:
    """The existing manifest if it is complete and matches; clears stale output."""
    output_dir = Path(config.output_dir)
    if not (output_dir / manifest.MANIFEST_NAME).exists():
        leftovers = _our_files(output_dir)
        if leftovers:
            log.warning("removing %d file(s) left by an unfinished run in %s",
                        len(leftovers), output_dir)
            for path in leftovers:
                path.unlink()
        return None
    try:
        existing = manifest.load_manifest(output_dir)
        same = (existing.data["options"] == config.identity()
                and existing.data["source"]["fingerprint"] == fingerprint)
        if same:
            existing.verify(checksums=False)
    except (manifest.ManifestError, manifest.ShardIntegrityError, KeyError) as error:
        same, reason = False, f"the existing output is damaged ({error})"
    else:
        reason = "it was prepared with other options or from other source files"
    if same:
        return existing
    if not config.overwrite:
        raise PrepareError(
            f"{output_dir} already holds a prepared dataset, but {reason}. "
            f"Pass --overwrite to replace it, or choose another --output_dir.")
    log.info("overwriting %s", output_dir)
    (output_dir / manifest.MANIFEST_NAME).unlink()  # first: never a manifest over missing shards
    for path in _our_files(output_dir):
        path.unlink()
    return None


# ---------------------------------------------------------------- splitting

def _hash_files(entries: list[_Entry], workers: int, show: bool) -> None:
    def work(entry: _Entry):
        if entry.source.hidden:
            return "hidden file (dot-file or __MACOSX), not an image", None
        try:
            return None, shards.file_sha256(entry.source.path)
        except OSError as error:
            return f"unreadable: {error.strerror or error}", None

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(work, entries)
        for entry, (reason, digest) in _progress(zip(entries, results), len(entries),
                                                 "hashing", show):
            entry.sha256 = digest
            if reason:
                entry.skip(reason)


def _duplicates(entries: list[_Entry]) -> dict[str, list[list[str]]]:
    by_hash: dict[str, list[_Entry]] = collections.defaultdict(list)
    for e in entries:
        if e.sha256:
            by_hash[e.sha256].append(e)
    report = {"within_split": [], "across_splits": [], "across_classes": []}
    for group in by_hash.values():
        if len(group) < 2:
            continue
        paths = [e.source.relpath for e in group]
        if len({e.source.label for e in group}) > 1:
            report["across_classes"].append(paths)
        elif len({e.split for e in group}) > 1:
            report["across_splits"].append(paths)
        else:
            report["within_split"].append(paths)
    return report


def _skip_label_conflicts(entries: list[_Entry]) -> None:
    labels: dict[str, set[str]] = collections.defaultdict(set)
    for e in entries:
        if e.sha256 and e.status == "pending":
            labels[e.sha256].add(e.source.label)
    for e in entries:
        if e.status == "pending" and len(labels[e.sha256]) > 1:
            e.skip("label conflict: identical content is labelled both normal and pneumonia")


def _assign(entries: list[_Entry], config: PrepareConfig) -> tuple[str, list[str]]:
    """Sets entry.split for pending entries; returns (mode, split names)."""
    live = [e for e in entries if e.status == "pending"]
    official = {e.source.official_split for e in live}
    mode = config.resplit
    if official == {None}:
        mode = "all"  # plain layout: nothing official to keep
    if mode == "all":
        fractions = {"train": 1 - config.val_fraction - config.test_fraction,
                     "val": config.val_fraction, "test": config.test_fraction}
        pool, fixed = live, []
    else:
        fractions = {"train": 1 - config.val_fraction, "val": config.val_fraction}
        pool = [e for e in live if e.source.official_split != "test"]
        fixed = [e for e in live if e.source.official_split == "test"]
    fractions = {k: v for k, v in fractions.items() if v > 0}
    groups = split.connected_groups([e.source.patient_id for e in pool],
                                    [e.sha256 for e in pool])
    names = split.assign_splits(groups, [e.source.label_index for e in pool],
                                fractions, config.seed)
    for e, name in zip(pool, names):
        e.split = name
    for e in fixed:
        e.split = "test"
    split_names = list(fractions) + (["test"] if fixed else [])
    return mode, split_names


def _check_leakage(entries: list[_Entry], allow: bool) -> list[str]:
    live = [e for e in entries if e.status == "pending"]
    try:
        split.check_no_leakage([e.split for e in live],
                               [e.source.patient_id for e in live],
                               [e.sha256 for e in live],
                               key_names=("patient id", "content hash (identical image)"))
    except split.LeakageError as error:
        if not allow:
            raise split.LeakageError(
                f"{error}. The official test split is kept as it is (--resplit=official); "
                f"use --resplit=all to re-split everything by patient, or "
                f"--allow_leakage to write anyway.") from None
        log.warning("writing despite leakage (--allow_leakage): %s", error)
        return [str(error)]
    return []


# ---------------------------------------------------------------- writing

def _estimated_record_bytes(config: PrepareConfig) -> float:
    pixels = config.image_size ** 2
    return {"raw": pixels, "png": pixels * 0.5, "jpeg": pixels * 0.25}[config.encoding] + 300


def _write_shards(entries: list[_Entry], split_names: list[str], config: PrepareConfig,
                  workers: int) -> tuple[dict, dict]:
    output_dir = Path(config.output_dir)
    rng = np.random.default_rng(config.seed)
    plan = []  # (split, label, [entries]) in writing order
    for split_name in split_names:
        for label in sources.CLASSES:
            members = [e for e in entries if e.status == "pending" and e.split == split_name
                       and e.source.label == label]
            members = [members[i] for i in rng.permutation(len(members))]
            plan.append((split_name, label, members))

    def work(entry: _Entry):
        try:
            data = entry.source.path.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                return "source file changed while preparing", None
            pixels = decode.decode_to_gray(data, config.image_size, config.resize,
                                           config.max_pixels, config.fast_jpeg)
            return None, shards.encode_image(pixels, config.encoding, config.jpeg_quality)
        except decode.DecodeError as error:
            return str(error), None
        except OSError as error:
            return f"unreadable: {error.strerror or error}", None

    total = sum(len(m) for _, _, m in plan)
    shard_table: dict[str, dict[str, list]] = {}
    counts: dict[str, dict[str, int]] = {}
    per_shard = max(1, int(config.shard_mb * 1e6 / _estimated_record_bytes(config)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        stream = ((e, pool.submit(work, e)) for _, _, members in plan for e in members)
        # Keep a bounded window of decodes in flight, consume in order.
        window: collections.deque = collections.deque()
        bar = _progress_bar(total, "decoding", config.progress)
        for split_name, label, members in plan:
            n_shards = max(1, math.ceil(len(members) / per_shard))
            entries_list = shard_table.setdefault(split_name, {}).setdefault(label, [])
            written = 0
            index, writer = 0, None
            for i in range(len(members)):
                while len(window) < 4 * workers + 1:
                    nxt = next(stream, None)
                    if nxt is None:
                        break
                    window.append(nxt)
                entry, future = window.popleft()
                reason, encoded = future.result()
                bar.update(1)
                target = min(n_shards - 1, i * n_shards // len(members))
                if writer is None or target != index:
                    if writer is not None:
                        entries_list.append(writer.close())
                    index = target
                    writer = shards.ShardWriter(
                        output_dir, shards.shard_name(split_name, label, index, n_shards))
                if reason:
                    entry.skip(reason)
                    continue
                writer.write(shards.make_example(
                    encoded, entry.source.label_index, entry.source.subtype,
                    entry.source.patient_id, entry.source.relpath, entry.sha256))
                entry.status, entry.shard = "written", writer.final_path.name
                written += 1
            if writer is not None:
                entries_list.append(writer.close())
            counts.setdefault(split_name, {})[label] = written
        bar.close()
    return shard_table, counts


def _summary_table(data: dict[str, Any], seconds: float) -> str:
    lines = [f"{'split':<8}{'normal':>10}{'pneumonia':>11}{'total':>9}{'shards':>8}"]
    for split_name, by_class in data["counts"].items():
        n_shards = sum(len(v) for v in data["shards"][split_name].values())
        lines.append(f"{split_name:<8}{by_class.get('normal', 0):>10}"
                     f"{by_class.get('pneumonia', 0):>11}{sum(by_class.values()):>9}"
                     f"{n_shards:>8}")
    written = sum(sum(c.values()) for c in data["counts"].values())
    lines.append(f"written {written} of {len(data['files'])} files in {seconds:.1f}s "
                 f"({written / max(seconds, 1e-9):.0f} img/s)")
    for reason, n in data["skipped"].items():
        lines.append(f"skipped {n}: {reason}")
    dup = data["duplicates"]
    lines.append(f"identical files: {len(dup['within_split'])} group(s) within a split, "
                 f"{len(dup['across_splits'])} across splits, "
                 f"{len(dup['across_classes'])} across classes (skipped)")
    return "\n".join(lines)


def prepare(config: PrepareConfig) -> manifest.Manifest:
    """Runs the ingest job; returns the manifest of the (possibly existing) output."""
    from pneumo_data import __version__, synthetic
    config.validate()
    if config.source_dir is None:
        config = dataclasses.replace(config, source_dir=str(synthetic.default_dataset_dir()))
        log.info("no --source_dir: using the embedded default dataset at %s", config.source_dir)
    config = dataclasses.replace(config, source_dir=str(Path(config.source_dir).resolve()))
    start = time.perf_counter()
    try:
        found = sources.find_sources(config.source_dir, config.patient_id_regex)
    except sources.SourceLayoutError as error:
        raise PrepareError(str(error)) from None
    present = {f.label for f in found if not f.hidden}
    if len(present) < 2:
        raise PrepareError(
            f"{config.source_dir}: only class {sorted(present)} has files; both NORMAL and "
            f"PNEUMONIA folders with images are needed")
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _source_fingerprint(found)
    existing = _existing_output(config, fingerprint)
    if existing is not None:
        log.info("%s is up to date (same options, same source files): nothing to do", output_dir)
        return existing

    workers = config.num_workers or os.cpu_count() or 1
    entries = [_Entry(f) for f in found]
    _hash_files(entries, workers, config.progress)
    _skip_label_conflicts(entries)
    mode, split_names = _assign(entries, config)
    leakage = _check_leakage(entries, config.allow_leakage)
    shard_table, counts = _write_shards(entries, split_names, config, workers)
    for split_name in split_names:
        missing = [label for label in sources.CLASSES if counts[split_name][label] == 0]
        if missing and split_name == "train":
            raise PrepareError(f"the train split has no {', '.join(missing)} images after "
                               f"skipping unreadable files; nothing usable to train on")
        if missing:
            log.warning("split %s has no %s images", split_name, ", ".join(missing))
    seconds = time.perf_counter() - start
    skipped = collections.Counter(e.reason.split(":")[0] for e in entries if e.status == "skipped")
    data = {
        "format": manifest.FORMAT,
        "format_version": manifest.FORMAT_VERSION,
        "library_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": config.identity(),
        "source": {"dir": config.source_dir, "files": len(found), "fingerprint": fingerprint,
                   "official_splits": sorted({f.official_split or "none" for f in found}),
                   "split_mode": mode},
        "image": {"size": config.image_size, "channels": 1, "dtype": "uint8",
                  "encoding": config.encoding, "resize": config.resize},
        "classes": list(sources.CLASSES),
        "counts": counts,
        "shards": shard_table,
        "skipped": dict(skipped.most_common()),
        "duplicates": _duplicates(entries),
        "leakage_allowed": leakage,
        "seconds": round(seconds, 2),
        "files": [e.row() for e in entries],
    }
    manifest.write_manifest(output_dir, data)
    print(_summary_table(data, seconds), flush=True)
    return manifest.load_manifest(output_dir)



if __name__ == "__main__":
    from pneumo_data.flagconfig import run_job

    run_job("prepare", PrepareConfig, prepare, (PrepareError, split.LeakageError))
