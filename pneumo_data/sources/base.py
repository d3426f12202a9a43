"""What every source reader returns: the labelled files, and an account of everything else.

A reader (the Kaggle folder layout in :mod:`.kaggle`, CSV-labelled collections in
:mod:`.csv_labels`, run through :mod:`.presets`) turns a source folder into a
:class:`SourceScan`:

* ``files``: one :class:`SourceFile` per labelled file (``skip_reason`` set when it must not
  be read: hidden files, dangling links);
* ``unused``: the other files under the folder that a reader looked at and did not use, each
  with its status (``dropped``, ``conflicting_labels``, ``unlabelled``) and reason;
* ``ignored``: entries that are not sources at all (a README beside the class folders, the
  label CSVs themselves, hidden files of a CSV source);
* ``rows``: the fate of every row of the label tables (CSV sources);
* ``preset``, ``label_options`` (the label rule, so a report can say what "negative" meant) and
  ``inputs`` (label tables and split lists: their bytes are part of the source's identity).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any

from pneumo_data.common.errors import UserError

CLASSES = ("normal", "pneumonia")
OFFICIAL_SPLITS = ("train", "val", "test")


class SourceLayoutError(UserError):
    """The source folder is not in a layout this library understands."""


def name_problem(relpath: str) -> str | None:
    """Why a file cannot be ingested under its name, or None: a name that is not valid UTF-8
    (bytes Python keeps as surrogates) cannot be recorded in a shard or a manifest."""
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        shown = relpath.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return (f"file name is not valid UTF-8: rename {shown!r} (e.g. convmv -f latin1 -t "
                f"utf8) to ingest it")
    return None


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One labelled file."""

    path: Path            # absolute path
    relpath: str          # path relative to the source dir, with forward slashes
    label: str            # "normal" or "pneumonia"
    subtype: str          # "none", "bacterial", "viral" or "unknown"
    patient_id: str       # parsed id, or "file:<relpath>" when the source has none
    official_split: str | None  # "train"/"val"/"test" when the source says
    skip_reason: str | None = None  # set: recorded as skipped, never read
    view: str | None = None    # "PA", "AP", "LATERAL", ... when the source says (CSV or DICOM)
    origin: str | None = None  # where the label came from, e.g. "train.csv:17" (CSV sources)

    @property
    def label_index(self) -> int:
        return CLASSES.index(self.label)


@dataclasses.dataclass(frozen=True)
class Ignored:
    """An entry of the source folder that is not a source file, and why."""

    relpath: str
    reason: str


@dataclasses.dataclass(frozen=True)
class RowOutcome:
    """The fate of one label-table row. ``line`` is the row's (last) physical line, header = 1.

    ``status``: ``labelled``, ``merged``, ``duplicate_row``, ``dropped``, ``missing_file`` or
    ``conflicting_labels`` (see :mod:`pneumo_data.sources.csv_labels`).
    """

    table: str
    line: int
    status: str
    path: str | None = None      # resolved relpath (or the expected one, for missing files)
    label: str | None = None     # "normal" / "pneumonia" when the value decided one
    value: str = ""              # the raw label cell
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "line": self.line, "status": self.status,
                "path": self.path, "value": self.value, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class FileOutcome:
    """A file under the source folder that is not used, and why.

    ``status``: ``dropped`` (its rows were dropped, or its DICOM view is not allowed),
    ``conflicting_labels`` or ``unlabelled`` (no row names it).
    """

    relpath: str
    status: str
    label: str | None = None
    reason: str | None = None

    def row(self) -> dict[str, Any]:
        return {"path": self.relpath, "status": self.status, "label": self.label,
                "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class SourceScan:
    files: list[SourceFile]
    ignored: list[Ignored]
    unused: list[FileOutcome] = dataclasses.field(default_factory=list)
    rows: list[RowOutcome] = dataclasses.field(default_factory=list)
    preset: str = "kaggle"
    label_options: dict[str, Any] | None = None
    inputs: tuple[Path, ...] = ()   # label tables and split lists (absolute paths)
    label_values: dict[str, dict[str, int]] | None = None  # value -> {class or dropped: rows}
    label_warnings: tuple[str, ...] = ()  # values that look mislabelled (see csv_labels)

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts of row statuses and of file statuses (``labelled`` for ``files``)."""
        files = collections.Counter(u.status for u in self.unused)
        files["labelled"] = len(self.files)
        if self.ignored:
            files["ignored"] = len(self.ignored)
        return {"rows": dict(collections.Counter(r.status for r in self.rows)),
                "files": dict(files)}


def walk_once(folder: Path) -> tuple[list[tuple[Path, list[str]]], list[Path]]:
    """``os.walk`` of ``folder`` following symbolic links, each real folder once:
    ([(folder path, its file names sorted)], [links to a folder already walked (a loop or a
    second link to it), not entered])."""
    walked, repeated = [], []
    seen = {folder.resolve()}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            sub = Path(dirpath) / name
            real = sub.resolve()
            if real in seen:
                repeated.append(sub)
                continue
            seen.add(real)
            kept.append(name)
        dirnames[:] = kept
        walked.append((Path(dirpath), sorted(filenames)))
    return walked, repeated
