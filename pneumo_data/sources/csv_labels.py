r"""CSV-labelled sources: images anywhere under ``source_dir``, labels and patients in CSV tables.

The output is a :class:`pneumo_data.sources.SourceScan`, as for the Kaggle folder layout: the
labelled :class:`~pneumo_data.sources.SourceFile` list (label, subtype, patient id, official
split, ``view`` and ``origin``) and a complete account: **every CSV row** and **every file under
source_dir** ends in exactly one outcome.

CSV rows (:class:`RowOutcome`):

* ``labelled``: the row gave its file a label.
* ``merged``: another row of an already labelled file with the same label and different cells
  (``multiple_rows="merge"``: RSNA has one row per box).
* ``duplicate_row``: the same file again with the same label (``multiple_rows="unique"``), or
  a row whose cells all equal an earlier row's.
* ``dropped``: a rule excluded it; ``reason`` says which (empty path, a drop value such as an
  uncertain label, a value that is neither positive nor negative, a view not allowed, an
  ambiguous file name, a file in two official split lists).
* ``missing_file``: the row would have been used, but its file is not under ``source_dir``.
* ``conflicting_labels``: its file also has a row with the other label; the file is not used.

Files: ``labelled`` (``SourceScan.files``); ``dropped`` (all its rows were dropped, or the rule
that dropped it needed the file itself, e.g. its DICOM ViewPosition), ``conflicting_labels`` and
``unlabelled`` (an image no row names: e.g. RSNA's unlabelled test images) in
``SourceScan.unused`` (:class:`~pneumo_data.sources.FileOutcome`); ``ignored`` (hidden files,
dangling links, and files that are not images by suffix and that no row names: the CSVs
themselves, READMEs) in ``SourceScan.ignored``.

Rules, in order, per row: empty path -> dropped; label value -> positive / dropped / negative /
dropped (see :func:`label_of`); view from the CSV not allowed -> dropped; file not found ->
missing_file. Then per file: conflicts, duplicates, merges; patient id and view from the DICOM
header when the CSV has none (read without decoding pixels); a DICOM view not allowed -> dropped.
Decode failures are not decided here: the writer records them as skips when it decodes.

Values are compared after :func:`normalise_value`: stripped, case-folded, and numbers written
canonically, so the CSV's ``1.0`` equals the option's ``1`` and ``-1.0`` equals ``-1``.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Iterable

import pneumo_data.sources.dicom_tags as dicom_tags
from pneumo_data.common.errors import UserError
from pneumo_data.sources.base import (
    FileOutcome,
    Ignored,
    RowOutcome,
    SourceFile,
    SourceScan,
    walk_once,
)

__all__ = ["CsvLabelError", "LabelTable", "CsvLabelConfig", "find_labelled", "label_of",
           "normalise_value", "parse_values", "IMAGE_SUFFIXES", "BLANK"]

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

LABELLED, MERGED, DUPLICATE, DROPPED = "labelled", "merged", "duplicate_row", "dropped"
MISSING, CONFLICT, UNLABELLED, IGNORED = "missing_file", "conflicting_labels", "unlabelled", \
    "ignored"
ROW_STATUSES = (LABELLED, MERGED, DUPLICATE, DROPPED, MISSING, CONFLICT)
FILE_STATUSES = (LABELLED, DROPPED, CONFLICT, UNLABELLED, IGNORED)


class CsvLabelError(UserError):
    """The tables cannot be read with these options (missing file or column); says which."""


@dataclasses.dataclass(frozen=True)
class LabelTable:
    """One labels CSV.

    Attributes:
      path: the CSV, relative to source_dir (or absolute).
      official_split: split every row of this table belongs to (``test`` keeps it as the
        test split, as Kaggle's test folder is kept); ``None``: no official split.
      path_prefix: folder (relative to source_dir, ending in ``/``) the path column is relative
        to, after ``CsvLabelConfig.strip_prefixes`` are removed.
    """

    path: str
    official_split: str | None = None
    path_prefix: str = ""


@dataclasses.dataclass(frozen=True)
class CsvLabelConfig:
    """How to read labels, patients and views from CSV tables.

    Attributes:
      tables: the labels CSVs.
      path_column: column naming the image (a path, a file name, or an id; see
        ``path_template`` and ``path_lookup``).
      label_column: column holding the label value(s).
      positive_values: values meaning pneumonia.
      negative_values: values meaning not pneumonia; ``None``: every value that is neither
        positive nor a drop value (blank included) is negative.
      drop_values: values whose rows are dropped (e.g. ``-1``, CheXpert's uncertain).
      separator: splits multi-label cells (``Atelectasis|Pneumonia``); a cell is positive when
        any part is, dropped when any part is a drop value, negative when every part is.
      patient_column: column with the patient id; else ``patient_regex`` on the path; else the
        DICOM PatientID tag (``dicom_tags``); else ``file:<relpath>`` (its own patient).
      patient_regex: regex on the resolved relpath; its first group is the patient id.
      view_columns: columns holding the view; the first non-empty one counts (upper-cased).
      views: allowed views (upper-case); ``None`` keeps every view, including unknown ones.
        With ``views`` set, a file whose view is unknown is dropped.
      path_template: ``str.format`` template applied to the path cell (``{}.dcm``).
      path_lookup: ``relative`` (the cell is a path relative to the table's ``path_prefix``) or
        ``basename`` (the cell is a file name found anywhere under source_dir).
      strip_prefixes: removed from the start of a path cell (first match), e.g.
        ``CheXpert-v1.0-small/`` when the folder was renamed.
      multiple_rows: ``unique`` (a second row for a file is a duplicate) or ``merge`` (rows of
        one file with the same label are one label: boxes).
      dicom_tags: read PatientID and ViewPosition from DICOM headers when the CSV has none.
      split_lists: ``(split, list file)`` pairs: text files of file names (one a line) whose
        files belong to that official split (NIH's ``test_list.txt``); they win over the
        table's split.
    """

    tables: tuple[LabelTable, ...]
    path_column: str
    label_column: str
    positive_values: tuple[str, ...] = ("1",)
    negative_values: tuple[str, ...] | None = None
    drop_values: tuple[str, ...] = ()
    separator: str | None = None
    patient_column: str | None = None
    patient_regex: str | None = None
    view_columns: tuple[str, ...] = ()
    views: tuple[str, ...] | None = None
    path_template: str = "{}"
    path_lookup: str = "relative"
    strip_prefixes: tuple[str, ...] = ()
    multiple_rows: str = "unique"
    dicom_tags: bool = True
    split_lists: tuple[tuple[str, str], ...] = ()

    def validate(self) -> None:
        if not self.tables:
            raise CsvLabelError("at least one labels CSV is needed")
        if self.path_lookup not in ("relative", "basename"):
            raise CsvLabelError(f"path_lookup must be relative or basename, "
                                f"got {self.path_lookup!r}")
        if self.multiple_rows not in ("unique", "merge"):
            raise CsvLabelError(f"multiple_rows must be unique or merge, "
                                f"got {self.multiple_rows!r}")
        if not self.positive_values:
            raise CsvLabelError("positive_values is empty: nothing would mean pneumonia")
        pos = {normalise_value(v) for v in self.positive_values}
        for name in ("negative_values", "drop_values"):
            overlap = pos & {normalise_value(v) for v in getattr(self, name) or ()}
            if overlap:
                raise CsvLabelError(f"{sorted(overlap)} are both positive and in {name}")
        if "{}" not in self.path_template:
            raise CsvLabelError(f"path_template needs a '{{}}', got {self.path_template!r}")
        if self.patient_regex:
            try:
                re.compile(self.patient_regex)
            except re.error as error:
                raise CsvLabelError(f"patient regex {self.patient_regex!r}: {error}") from None

    def to_dict(self) -> dict:
        """JSON-ready, for the manifest (what "positive" and "negative" meant)."""
        values = dataclasses.asdict(self)
        values["tables"] = [dataclasses.asdict(t) for t in self.tables]
        values["split_lists"] = [list(pair) for pair in self.split_lists]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# ---------------------------------------------------------------- values

def normalise_value(value: str | None) -> str:
    """Stripped, case-folded; numbers canonical (``1.0`` -> ``1``, ``-1.0`` -> ``-1``)."""
    text = (value or "").strip()
    try:
        number = float(text)
    except ValueError:
        return text.casefold()
    if number != number:  # NaN, as pandas writes blanks
        return ""
    return str(int(number)) if number.is_integer() else repr(number)


def label_of(cell: str, config: CsvLabelConfig) -> tuple[str | None, str | None]:
    """``(label, None)`` or ``(None, reason to drop)`` for one label cell."""
    parts = cell.split(config.separator) if config.separator else [cell]
    tokens = [normalise_value(p) for p in parts] or [""]
    positive = {normalise_value(v) for v in config.positive_values}
    drop = {normalise_value(v) for v in config.drop_values}
    if any(t in positive for t in tokens):
        return "pneumonia", None
    dropped = [t for t in tokens if t in drop]
    if dropped:
        return None, f"{config.label_column}={cell.strip()!r} is a drop value"
    negative = None if config.negative_values is None else {
        normalise_value(v) for v in config.negative_values}
    if negative is None or all(t in negative for t in tokens):
        return "normal", None
    return None, (f"{config.label_column}={cell.strip()!r} is neither positive "
                  f"({', '.join(config.positive_values)}) nor negative "
                  f"({', '.join(config.negative_values or ())})")


# ---------------------------------------------------------------- files

def _walk(source_dir: Path) -> tuple[list[str], list[Ignored]]:
    """(visible files, ignored entries) as relpaths with forward slashes, sorted.

    Symbolic links to files and folders are followed (a folder reached twice is walked once);
    hidden files, ``__MACOSX`` and dangling links are ignored with their reason.
    """
    visible = []
    walked, repeated = walk_once(source_dir)
    ignored = [Ignored(sub.relative_to(source_dir).as_posix(),
                       "symbolic link to a folder already walked") for sub in repeated]
    for dirpath, filenames in walked:
        inside_hidden = any(part.startswith(".") or part == "__MACOSX"
                            for part in Path(dirpath).relative_to(source_dir).parts)
        for name in filenames:
            path = dirpath / name
            rel = path.relative_to(source_dir).as_posix()
            if inside_hidden or name.startswith("."):
                ignored.append(Ignored(rel, "hidden file (dot-file or __MACOSX), not an image"))
            elif path.is_symlink() and not path.exists():
                ignored.append(Ignored(rel, f"dangling symbolic link (its target "
                                            f"{os.readlink(path)} is missing)"))
            elif not path.is_file():
                ignored.append(Ignored(rel, "not a regular file (device, socket or pipe)"))
            else:
                visible.append(rel)
    return sorted(visible), ignored


def _is_image_name(relpath: str) -> bool:
    return relpath.lower().endswith(IMAGE_SUFFIXES)


def _table_path(source_dir: Path, table: LabelTable) -> Path:
    return Path(table.path) if os.path.isabs(table.path) else source_dir / table.path


def _read_table(source_dir: Path, table: LabelTable, config: CsvLabelConfig):
    path = _table_path(source_dir, table)
    if not path.is_file():
        raise CsvLabelError(f"labels CSV {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        needed = [config.path_column, config.label_column]
        needed += [c for c in (config.patient_column,) if c]
        needed += list(config.view_columns)
        missing = [c for c in needed if c not in columns]
        if missing:
            raise CsvLabelError(f"{path.name}: no column {', '.join(map(repr, missing))}; "
                                f"its columns are {', '.join(map(repr, columns))}")
        for row in reader:
            yield reader.line_num, row


def _read_split_lists(source_dir: Path, config: CsvLabelConfig) -> dict[str, list[str]]:
    """File name (basename) -> the official splits whose list names it."""
    listed: dict[str, list[str]] = collections.defaultdict(list)
    for split_name, list_file in config.split_lists:
        path = source_dir / list_file
        if not path.is_file():
            raise CsvLabelError(f"split list {path} does not exist")
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            name = line.strip()
            if name:
                listed[Path(name).name].append(split_name)
    return listed


def _candidate(cell: str, table: LabelTable, config: CsvLabelConfig) -> str:
    value = cell.strip().replace("\\", "/")
    for prefix in config.strip_prefixes:
        if value.startswith(prefix):
            value = value[len(prefix):]
            break
    return config.path_template.format(value)


@dataclasses.dataclass
class _Row:
    table: LabelTable
    line: int
    cells: dict[str, str]
    value: str
    label: str | None = None
    relpath: str | None = None
    status: str | None = None
    reason: str | None = None

    def outcome(self) -> RowOutcome:
        return RowOutcome(table=self.table.path, line=self.line, status=self.status,
                          path=self.relpath, label=self.label, value=self.value,
                          reason=self.reason)


def _view_of(cells: dict[str, str], config: CsvLabelConfig) -> str | None:
    for column in config.view_columns:
        value = (cells.get(column) or "").strip().upper()
        if value:
            return value
    return None


def find_labelled(source_dir: str | os.PathLike, config: CsvLabelConfig,
                  preset: str = "csv") -> SourceScan:
    """Labels every file under ``source_dir`` from the CSV tables and accounts for the rest.

    Raises:
      CsvLabelError: a table or split list is missing, or lacks a needed column.
    """
    config.validate()
    source_dir = Path(source_dir).resolve()
    if not source_dir.is_dir():
        raise CsvLabelError(f"source_dir {source_dir} does not exist or is not a folder")
    visible, ignored = _walk(source_dir)
    present = set(visible)
    by_name: dict[str, list[str]] = collections.defaultdict(list)
    for rel in visible:
        by_name[Path(rel).name].append(rel)
    listed = _read_split_lists(source_dir, config)
    allowed = None if config.views is None else {v.strip().upper() for v in config.views}

    rows: list[_Row] = []
    for table in config.tables:
        for line, cells in _read_table(source_dir, table, config):
            row = _Row(table, line, cells, cells.get(config.label_column) or "")
            rows.append(row)
            cell = (cells.get(config.path_column) or "").strip()
            if not cell:
                row.status, row.reason = DROPPED, f"empty {config.path_column!r}"
                continue
            row.label, reason = label_of(row.value, config)
            candidate = _candidate(cell, table, config)
            if config.path_lookup == "relative":
                row.relpath = table.path_prefix + candidate
            else:
                matches = by_name.get(Path(candidate).name, [])
                row.relpath = matches[0] if len(matches) == 1 else candidate
                if len(matches) > 1 and reason is None:
                    reason = f"ambiguous file name: {len(matches)} files are named " \
                             f"{Path(candidate).name!r} ({', '.join(matches[:3])})"
            view = _view_of(cells, config)
            if reason is None and allowed is not None and view and view not in allowed:
                reason = f"view {view} not in allowed views {', '.join(sorted(allowed))}"
            if reason is not None:
                row.status, row.reason = DROPPED, reason
            elif row.relpath not in present:
                row.status = MISSING
                row.reason = f"no file {row.relpath} under source_dir"

    # ---- per file: conflicts, duplicates, merges
    live: dict[str, list[_Row]] = collections.defaultdict(list)
    for row in rows:
        if row.status is None:
            live[row.relpath].append(row)
    files: list[SourceFile] = []
    outcomes: dict[str, FileOutcome | None] = {}
    pattern = re.compile(config.patient_regex) if config.patient_regex else None
    for relpath, group in live.items():
        labels = {r.label for r in group}
        if len(labels) > 1:
            where = "; ".join(f"{r.label} at {r.table.path}:{r.line}" for r in group)
            for r in group:
                r.status, r.reason = CONFLICT, f"the same file is labelled {where}"
            outcomes[relpath] = FileOutcome(relpath, CONFLICT, None, group[0].reason)
            continue
        first, seen = group[0], {}
        for r in group:
            key = tuple(sorted(r.cells.items()))
            if r is first:
                seen[key] = r
                continue
            if key in seen:
                r.status = DUPLICATE
                r.reason = f"repeats {seen[key].table.path}:{seen[key].line}"
            elif config.multiple_rows == "merge":
                r.status = MERGED
                r.reason = f"another row of the file labelled at {first.table.path}:{first.line}"
                seen[key] = r
            else:
                r.status = DUPLICATE
                r.reason = f"the file is already labelled at {first.table.path}:{first.line}"
                seen[key] = r
        name = Path(relpath).name
        splits = sorted(set(listed.get(name, [])))
        official = splits[0] if len(splits) == 1 else first.table.official_split
        drop_reason = None
        if len(splits) > 1:
            drop_reason = f"listed in more than one official split ({', '.join(splits)})"
        view = _view_of(first.cells, config)
        patient = (first.cells.get(config.patient_column) or "").strip() \
            if config.patient_column else ""
        if not patient and pattern is not None:
            match = pattern.search(relpath)
            if match:
                patient = match.group(1) if match.groups() else match.group(0)
        if config.dicom_tags and (not patient or not view) and dicom_tags.may_be_dicom(relpath):
            header = dicom_tags.read_tags(source_dir / relpath)
            if header is not None:
                patient = patient or (header.patient_id or "")
                view = view or header.view_position
        if drop_reason is None and allowed is not None and view not in allowed:
            drop_reason = (f"view {view} not in allowed views {', '.join(sorted(allowed))}"
                           if view else "view unknown (no view column value and no DICOM "
                                        "ViewPosition) and only some views are allowed")
        if drop_reason is not None:
            for r in group:
                r.status, r.reason = DROPPED, drop_reason
            outcomes[relpath] = FileOutcome(relpath, DROPPED, first.label, drop_reason)
            continue
        first.status = LABELLED
        label = first.label
        files.append(SourceFile(
            path=source_dir / relpath, relpath=relpath, label=label,
            subtype="unknown" if label == "pneumonia" else "none",
            patient_id=patient or f"file:{relpath}", official_split=official,
            view=view, origin=f"{first.table.path}:{first.line}"))
        outcomes[relpath] = None

    # ---- files no live row reached
    dropped_rows: dict[str, list[_Row]] = collections.defaultdict(list)
    for row in rows:
        if row.status == DROPPED and row.relpath and row.relpath not in outcomes:
            dropped_rows[row.relpath].append(row)
    own_inputs = {t.path: "label table (read for the labels)" for t in config.tables}
    own_inputs.update({f: "split list (read for the official splits)"
                       for _, f in config.split_lists})
    for rel in visible:
        if rel in outcomes:
            continue
        if rel in dropped_rows:
            first = dropped_rows[rel][0]
            outcomes[rel] = FileOutcome(rel, DROPPED, first.label, first.reason)
        elif _is_image_name(rel):
            outcomes[rel] = FileOutcome(rel, UNLABELLED, None, "no CSV row names this file")
        elif rel in own_inputs:
            ignored.append(Ignored(rel, own_inputs[rel]))
        else:
            ignored.append(Ignored(rel, f"not an image file ({Path(rel).suffix or 'no suffix'})"
                                        f" and no CSV row names it"))
    files.sort(key=lambda f: f.relpath)
    inputs = [_table_path(source_dir, t) for t in config.tables]
    inputs += [source_dir / list_file for _, list_file in config.split_lists]
    values, warnings = label_value_report(rows, config)
    return SourceScan(
        files=files, ignored=sorted(ignored, key=lambda i: i.relpath),
        unused=[outcomes[k] for k in sorted(outcomes) if outcomes[k] is not None],
        rows=[r.outcome() for r in rows], preset=preset, label_options=config.to_dict(),
        inputs=tuple(inputs), label_values=values, label_warnings=tuple(warnings))


def label_value_report(rows, config: CsvLabelConfig) -> tuple[dict, list[str]]:
    """Per distinct label value (as the table spells it), how many rows went to each class
    (or were dropped); and a warning for every value that went to ``normal`` although it
    looks like a positive value (a typo such as "Pnuemonia", or "pneumonia?"), which happens
    silently when ``negative_values`` is not given (every other value is negative)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        counts[row.value.strip() or BLANK][row.label or "dropped"] += 1
    positive = [normalise_value(v) for v in config.positive_values]
    warnings = []
    for value, by_outcome in sorted(counts.items()):
        near = _near(normalise_value(value), positive)
        if by_outcome.get("normal") and near is not None:
            warnings.append(
                f"label value {value!r} ({by_outcome['normal']} row(s)) counted as normal, but "
                f"it looks like the positive value {near!r}: a typo? Add it to "
                f"--positive_values, or list the negative values (--negative_values) so that "
                f"anything else is dropped and reported")
    return {value: dict(sorted(c.items())) for value, c in sorted(counts.items())}, warnings


def _near(value: str, positives: list[str]) -> str | None:
    """The positive value ``value`` is close to (but not equal to), or None."""
    if not value or value in positives:
        return None
    for positive in positives:
        if len(positive) < 3:  # "1", "yes": too short to judge spelling
            continue
        squeezed = re.sub(r"[^a-z0-9]", "", value)
        if positive in value or squeezed == re.sub(r"[^a-z0-9]", "", positive) or \
                difflib.SequenceMatcher(None, value, positive).ratio() >= 0.8:
            return positive
    return None


BLANK = "<blank>"  # how a flag names the empty cell, e.g. --negative_values=0,<blank>


def parse_values(text: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """``"a,b"`` or ``["a", "b"]`` -> ``("a", "b")``, ``<blank>`` -> ``""``; ``None`` stays."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for part in parts:
        part = part.strip()
        if part == BLANK:
            values.append("")
        elif part:
            values.append(part)
    return tuple(values)
