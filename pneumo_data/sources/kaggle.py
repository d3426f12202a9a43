"""The Kaggle folder layout (Kermany et al. 2018): labels from the folder names.

Two layouts are understood, folder names matched case-insensitively:

* Kaggle: ``SRC/[chest_xray/]{train,val,test}/{NORMAL,PNEUMONIA}/...``
  (the split folder is remembered as the file's *official split*).
* Plain: ``SRC/{NORMAL,PNEUMONIA}/...`` (no official split).

Every file under a class folder is returned, images or not: the decoder decides
what is readable, so that nothing is skipped without a recorded reason. Files
that are never decoded are returned too, with their reason set
(``skip_reason``): hidden files (``.DS_Store``), ``__MACOSX`` folders and
dangling symbolic links. Symbolic links to files and to folders are followed
(a link that leads back into a folder already walked is recorded, not walked
twice). Anything else at the layout's levels (a ``README`` beside ``train/``, a
folder ``OTHER/`` beside ``NORMAL/``) is not a source, and is returned in
:attr:`SourceScan.ignored` with the reason, so the manifest can list it.

Labels: ``normal`` (0) and ``pneumonia`` (1). Subtype from the file name:
``bacterial`` or ``viral`` for pneumonia (``unknown`` when the name says
neither), ``none`` for normal. Patient id from the file name with a regular
expression (the first group of ``DEFAULT_PATIENT_ID_REGEX`` by default); for a DICOM file
(``.dcm``, ``.dicom`` or no suffix) whose name does not match, the ``PatientID`` tag (and the
``ViewPosition`` tag as its view).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pneumo_data.sources.dicom_tags as dicom_tags
from pneumo_data.sources.base import (
    CLASSES,
    OFFICIAL_SPLITS,
    Ignored,
    SourceFile,
    SourceLayoutError,
    SourceScan,
    name_problem,
    walk_once,
)

# Person numbers are counted per subtype in Kermany et al. (person1_bacteria and
# person1_virus are different people) and IM-XXXX / NORMAL2-IM-XXXX are
# different series, so the patient key keeps the series and the subtype.
DEFAULT_PATIENT_ID_REGEX = r"^(person\d+_(?:bacteria|virus)|NORMAL2-IM-\d+|IM-\d+)(?:[_-]|$)"

_SUBTYPES = (("bacteria", "bacterial"), ("virus", "viral"))


def subtype_from_name(name: str, label: str) -> str:
    if label == "normal":
        return "none"
    lowered = name.lower()
    for token, subtype in _SUBTYPES:
        if token in lowered:
            return subtype
    return "unknown"


def patient_id_from_name(name: str, pattern: re.Pattern[str], relpath: str) -> str:
    """The first group of ``pattern`` (or the whole match); else a per-file id."""
    match = pattern.search(name)
    if match is None:
        return f"file:{relpath}"
    return match.group(1) if match.groups() else match.group(0)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _children(folder: Path) -> dict[str, Path]:
    """Sub-folders keyed by lower-case name, ignoring hidden ones."""
    result = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not _is_hidden(entry.name):
            key = entry.name.lower()
            if key in result:
                raise SourceLayoutError(f"{folder}: folders {result[key].name!r} and "
                                        f"{entry.name!r} differ only in case")
            result[key] = entry
    return result


def _class_folders(folder: Path) -> dict[str, Path]:
    children = _children(folder)
    return {name: children[name] for name in CLASSES if name in children}


def _layout(source_dir: Path) -> tuple[dict[str | None, dict[str, Path]], list[Path]]:
    """(official split -> class folders, the folders whose other entries are not sources)."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise SourceLayoutError(f"source_dir {source_dir} does not exist or is not a folder")
    root, levels = source_dir, [source_dir]
    # The Kaggle archive nests chest_xray/ (sometimes twice); descend through it.
    for _ in range(2):
        children = _children(root)
        if not set(children) & {*OFFICIAL_SPLITS, *CLASSES} and "chest_xray" in children:
            root = children["chest_xray"]
            levels.append(root)
    children = _children(root)
    splits = {s: _class_folders(children[s]) for s in OFFICIAL_SPLITS if s in children}
    splits = {s: c for s, c in splits.items() if c}
    plain = _class_folders(root)
    if splits and plain:
        raise SourceLayoutError(
            f"{root} holds both split folders ({', '.join(splits)}) and class folders "
            f"({', '.join(plain)}); use one layout")
    if splits:
        return splits, levels + [children[s] for s in splits]
    if plain:
        return {None: plain}, levels
    raise SourceLayoutError(
        f"{source_dir}: unknown layout. Expected either "
        f"'train|val|test/NORMAL|PNEUMONIA/<images>' (Kaggle chest_xray layout) or "
        f"'NORMAL|PNEUMONIA/<images>' (folder names case-insensitive); found folders: "
        f"{sorted(p.name for p in source_dir.iterdir() if p.is_dir()) or 'none'}")


def detect_layout(source_dir: Path) -> dict[str | None, dict[str, Path]]:
    """Maps official split (None for the plain layout) to its class folders."""
    return _layout(source_dir)[0]


def _ignored_entries(source_dir: Path, levels: list[Path], used: set[Path]) -> list[Ignored]:
    """Entries of the layout's folders that are neither walked nor part of the layout."""
    out = []
    for level in levels:
        for entry in sorted(level.iterdir()):
            if entry in used or entry.name == "__MACOSX" and level == source_dir:
                continue
            relpath = entry.relative_to(source_dir).as_posix()
            if _is_hidden(entry.name):
                reason = "hidden entry"
            elif entry.is_dir():
                reason = "folder that is not part of the layout (not a split or class folder)"
            elif not entry.exists():
                reason = "dangling symbolic link outside the class folders"
            else:
                reason = "file outside the class folders"
            out.append(Ignored(relpath, reason))
    return out


def _walk(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files under ``folder``, following symbolic links; (files, folders not walked + why)."""
    walked, repeated = walk_once(folder)
    found = [dirpath / name for dirpath, names in walked for name in names]
    return sorted(found), [(sub, "symbolic link to a folder already walked (a loop or a second "
                                 "link to it); its files are listed once") for sub in repeated]


def _file_problem(path: Path, folder: Path) -> str | None:
    """Why the file under class folder ``folder`` is skipped, or None."""
    if _is_hidden(path.name) or "__MACOSX" in path.relative_to(folder).parts:
        return "hidden file (dot-file or __MACOSX), not an image"
    if path.is_symlink() and not path.exists():
        return f"dangling symbolic link (its target {os.readlink(path)} is missing)"
    if not path.is_file():
        return "not a regular file (device, socket or pipe)"
    return None


def _skip_second_copies(files: list[SourceFile], source_dir: Path) -> list[SourceFile]:
    """A file reached twice, through a symbolic link inside a class folder (``NORMAL/loop ->
    ..`` reaches ``PNEUMONIA/`` from ``NORMAL/``), is used once: under the path that needs no
    link (else the first); the other copies are skipped with a reason naming the link, so
    they are neither labelled by the wrong folder nor read twice."""
    by_file: dict[Path, list[int]] = {}
    for i, f in enumerate(files):
        if f.skip_reason is None:
            by_file.setdefault(f.path.resolve(), []).append(i)
    out = list(files)
    for real, indices in by_file.items():
        if len(indices) < 2:
            continue
        keep = next((i for i in indices if files[i].path == real), indices[0])
        for i in indices:
            if i != keep:
                out[i] = dataclasses.replace(files[i], skip_reason=(
                    f"reached again through a symbolic link: the same file as "
                    f"{files[keep].relpath}, through {_first_link(files[i].path, source_dir)} "
                    f"(a link inside a class folder must not lead into another class)"))
    return out


def _first_link(path: Path, source_dir: Path) -> str:
    """The first component of ``path`` under ``source_dir`` that is a symbolic link."""
    current = source_dir
    for part in path.relative_to(source_dir).parts:
        current = current / part
        if current.is_symlink():
            return f"{current.relative_to(source_dir).as_posix()} -> {os.readlink(current)}"
    return "(none)"


def scan_sources(source_dir: str | os.PathLike,
                 patient_id_regex: str = DEFAULT_PATIENT_ID_REGEX) -> SourceScan:
    """Every file under the class folders of ``source_dir`` (sorted by relpath), and the
    entries that are not sources (see the module docstring)."""
    source_dir = Path(source_dir).resolve()
    pattern = re.compile(patient_id_regex)
    layout, levels = _layout(source_dir)
    files, ignored = [], []
    used = {folder for class_folders in layout.values() for folder in class_folders.values()}
    used |= set(levels)
    for split, class_folders in layout.items():
        for label, folder in class_folders.items():
            paths, skipped = _walk(folder)
            ignored += [Ignored(p.relative_to(source_dir).as_posix(), why) for p, why in skipped]
            for path in paths:
                relpath = path.relative_to(source_dir).as_posix()
                reason = name_problem(relpath) or _file_problem(path, folder)
                patient, view = patient_id_from_name(path.name, pattern, relpath), None
                if reason is None and patient.startswith("file:") and \
                        dicom_tags.may_be_dicom(path.name):
                    header = dicom_tags.read_tags(path)
                    if header is not None:
                        patient = header.patient_id or patient
                        view = header.view_position
                files.append(SourceFile(
                    path=path, relpath=relpath, label=label,
                    subtype=subtype_from_name(path.name, label), patient_id=patient,
                    official_split=split, skip_reason=reason, view=view))
    ignored += _ignored_entries(source_dir, levels, used)
    files = _skip_second_copies(sorted(files, key=lambda f: f.relpath), source_dir)
    if not [f for f in files if f.skip_reason is None]:
        raise SourceLayoutError(f"{source_dir}: the class folders hold no files")
    return SourceScan(files, sorted(ignored, key=lambda i: i.relpath), preset="kaggle",
                      label_options={"labels": "class folder names (NORMAL, PNEUMONIA)",
                                     "patient_id_regex": patient_id_regex})


def find_sources(source_dir: str | os.PathLike,
                 patient_id_regex: str = DEFAULT_PATIENT_ID_REGEX) -> list[SourceFile]:
    """Every file under the class folders of ``source_dir``, sorted by relpath."""
    return scan_sources(source_dir, patient_id_regex).files
