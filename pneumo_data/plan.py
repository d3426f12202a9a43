"""Planning half of ingest: every source file's fate, decided before anything is written.

:func:`make_plan` hashes the files, skips what cannot be used (hidden files, dangling links,
unreadable files, identical content labelled both ways), groups the rest by patient id and
identical content, assigns splits (:mod:`pneumo_data.split`), checks for leakage and fixes
the writing order and the shard count of every split x class. The result, a :class:`Plan`,
is all a writer needs: the threaded writer in :mod:`pneumo_data.prepare` and any other
(a Beam pipeline) produce the same shards from the same plan.

The plan needs every file's patient and hash, so it is computed once, up front, on one
machine; only decoding and writing scale out.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import math
from typing import Any

import numpy as np

from pneumo_data import sources, split
from pneumo_data.common.files import file_sha256


@dataclasses.dataclass
class Entry:
    """One source file's fate; becomes one row of ``manifest['files']``."""

    source: sources.SourceFile
    sha256: str | None = None
    split: str | None = None
    status: str = "pending"
    reason: str | None = None
    shard: str | None = None
    dicom: Any = None  # the writer's preprocess.DicomInfo for a DICOM file

    def row(self) -> dict[str, Any]:
        s = self.source
        row = {"path": s.relpath, "status": self.status, "label": s.label,
               "subtype": s.subtype, "patient_id": s.patient_id,
               "official_split": s.official_split, "sha256": self.sha256}
        if s.view is not None or s.origin is not None:
            row.update(view=s.view, origin=s.origin)
        if self.status == "written":
            row.update(split=self.split, shard=self.shard)
        else:
            row["reason"] = self.reason
        if self.dicom is not None:
            row["dicom"] = self.dicom.manifest_dict()
        return row

    def skip(self, reason: str) -> None:
        self.status, self.reason = "skipped", reason


@dataclasses.dataclass(frozen=True)
class ShardGroup:
    """The files of one split x class, in writing order, and how many shards they fill."""

    split: str
    label: str
    entries: tuple[Entry, ...]
    shards: int

    def shard_index(self, position: int) -> int:
        """The shard the ``position``-th entry goes to (contiguous runs, as even as possible)."""
        return min(self.shards - 1, position * self.shards // max(1, len(self.entries)))


@dataclasses.dataclass
class Plan:
    entries: list[Entry]
    mode: str                     # "official" or "all"
    split_names: list[str]
    groups: list[ShardGroup]
    leakage: list[str]            # non-empty only with allow_leakage
    ignored: list[sources.Ignored]

    def planned_counts(self) -> dict[str, dict[str, int]]:
        """Files to be written per split and class, before decoding (some may still fail)."""
        counts = {name: dict.fromkeys(sources.CLASSES, 0) for name in self.split_names}
        for group in self.groups:
            counts[group.split][group.label] += len(group.entries)
        return counts

    def duplicates(self) -> dict[str, list[list[str]]]:
        by_hash: dict[str, list[Entry]] = collections.defaultdict(list)
        for e in self.entries:
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


def source_fingerprint(found: list[sources.SourceFile] | sources.SourceScan) -> str:
    """Cheap identity of the source (file names and sizes), for the up-to-date check.

    For a :class:`SourceScan` also the files it did not use (they are listed in the
    manifest) and the full bytes of its label tables and split lists (labels can change while
    the images do not).
    """
    scan = found if isinstance(found, sources.SourceScan) else None
    digest = hashlib.sha256()
    for f in scan.files if scan else found:
        size = f.path.stat().st_size if f.skip_reason is None else -1
        digest.update(f"{f.relpath}\0{size}\n".encode("utf-8", "surrogateescape"))
    if scan is not None:
        for u in scan.unused:
            digest.update(f"{u.relpath}\0{u.status}\n".encode("utf-8", "surrogateescape"))
        for index, path in enumerate(scan.inputs):
            digest.update(f"{index}\0{path.name}\0{file_sha256(path)}\n".encode(
                "utf-8", "surrogateescape"))
    return digest.hexdigest()


def _hash_files(entries: list[Entry], workers: int, progress) -> None:
    def work(entry: Entry):
        if entry.source.skip_reason:
            return entry.source.skip_reason, None
        try:
            return None, file_sha256(entry.source.path)
        except OSError as error:
            return f"unreadable: {error.strerror or error}", None

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(work, entries)
        for entry, (reason, digest) in progress(zip(entries, results), len(entries), "hashing"):
            entry.sha256 = digest
            if reason:
                entry.skip(reason)


def _skip_label_conflicts(entries: list[Entry]) -> None:
    labels: dict[str, set[str]] = collections.defaultdict(set)
    for e in entries:
        if e.sha256 and e.status == "pending":
            labels[e.sha256].add(e.source.label)
    for e in entries:
        if e.status == "pending" and len(labels[e.sha256]) > 1:
            e.skip("label conflict: identical content is labelled both normal and pneumonia")


def _assign(entries: list[Entry], config) -> tuple[str, list[str]]:
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
    return mode, list(fractions) + (["test"] if fixed else [])


def _check_leakage(entries: list[Entry], allow: bool, log) -> list[str]:
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


def estimated_record_bytes(image_size: int, encoding: str) -> float:
    pixels = image_size ** 2
    return {"raw": pixels, "png": pixels * 0.5, "jpeg": pixels * 0.25}[encoding] + 300


def _shard_groups(entries: list[Entry], split_names: list[str], config) -> list[ShardGroup]:
    rng = np.random.default_rng(config.seed)
    per_shard = max(1, int(config.shard_mb * 1e6
                           / estimated_record_bytes(config.image_size, config.encoding)))
    groups = []
    for split_name in split_names:
        for label in sources.CLASSES:
            members = [e for e in entries if e.status == "pending" and e.split == split_name
                       and e.source.label == label]
            members = [members[i] for i in rng.permutation(len(members))]
            groups.append(ShardGroup(split_name, label, tuple(members),
                                     max(1, math.ceil(len(members) / per_shard))))
    return groups


def make_plan(scan: sources.SourceScan, config, workers: int, progress, log) -> Plan:
    """The plan for ``scan`` under prepare options ``config`` (see the module docstring).

    ``progress(iterable, total, description)`` wraps the hashing loop (a progress bar or
    the identity).
    """
    entries = [Entry(f) for f in scan.files]
    _hash_files(entries, workers, progress)
    _skip_label_conflicts(entries)
    mode, split_names = _assign(entries, config)
    leakage = _check_leakage(entries, config.allow_leakage, log)
    return Plan(entries=entries, mode=mode, split_names=split_names,
                groups=_shard_groups(entries, split_names, config), leakage=leakage,
                ignored=scan.ignored)
