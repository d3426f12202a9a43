"""Stage 1 of ingest: find the source files and read their labels from the layout.

Two layouts are understood, folder names matched case-insensitively:

* Kaggle: ``SRC/[chest_xray/]{train,val,test}/{NORMAL,PNEUMONIA}/...``
  (the split folder is remembered as the file's *official split*).
* Plain: ``SRC/{NORMAL,PNEUMONIA}/...`` (no official split).

Every regular file under a class folder is returned, images or not: the decoder
decides what is readable, so that nothing is skipped without a recorded reason.
Hidden files (``.DS_Store``) and ``__MACOSX`` folders are returned too, marked,
so the manifest can list them as skipped.

Labels: ``normal`` (0) and ``pneumonia`` (1). Subtype from the file name:
``bacterial`` or ``viral`` for pneumonia (``unknown`` when the name says
neither), ``none`` for normal. Patient id from the file name with a regular
expression (the first group of ``DEFAULT_PATIENT_ID_REGEX`` by default).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

CLASSES = ("normal", "pneumonia")
OFFICIAL_SPLITS = ("train", "val", "test")

# Person numbers are counted per subtype in Kermany et al. (person1_bacteria and
# person1_virus are different people) and IM-XXXX / NORMAL2-IM-XXXX are
# different series, so the patient key keeps the series and the subtype.
DEFAULT_PATIENT_ID_REGEX = r"^(person\d+_(?:bacteria|virus)|NORMAL2-IM-\d+|IM-\d+)(?:[_-]|$)"

_SUBTYPES = (("bacteria", "bacterial"), ("virus", "viral"))


class SourceLayoutError(ValueError):
    """The source folder is not in a layout this library understands."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One file found under a class folder."""

    path: Path            # absolute path
    relpath: str          # path relative to the source dir, with forward slashes
    label: str            # "normal" or "pneumonia"
    subtype: str          # "none", "bacterial", "viral" or "unknown"
    patient_id: str       # parsed id, or "file:<relpath>" when the name has none
    official_split: str | None  # "train"/"val"/"test" for the Kaggle layout
    hidden: bool = False  # dot-file or inside __MACOSX: recorded, never decoded

    @property
    def label_index(self) -> int:
        return CLASSES.index(self.label)


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


def _children(folder: Path) -> dict[str, Path]:
    """Sub-folders keyed by lower-case name, ignoring hidden ones."""
    result = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name != "__MACOSX":
            key = entry.name.lower()
            if key in result:
                raise SourceLayoutError(
                    f"{folder}: folders {result[key].name!r} and {entry.name!r} differ only in case")
            result[key] = entry
    return result


def _class_folders(folder: Path) -> dict[str, Path]:
    children = _children(folder)
    return {name: children[name] for name in CLASSES if name in children}


def detect_layout(source_dir: Path) -> dict[str | None, dict[str, Path]]:
    """Maps official split (None for the plain layout) to its class folders."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise SourceLayoutError(f"source_dir {source_dir} does not exist or is not a folder")
    root = source_dir
    # The Kaggle archive nests chest_xray/ (sometimes twice); descend through it.
    for _ in range(2):
        children = _children(root)
        if not set(children) & {*OFFICIAL_SPLITS, *CLASSES} and "chest_xray" in children:
            root = children["chest_xray"]
    children = _children(root)
    splits = {s: _class_folders(children[s]) for s in OFFICIAL_SPLITS if s in children}
    splits = {s: c for s, c in splits.items() if c}
    plain = _class_folders(root)
    if splits and plain:
        raise SourceLayoutError(
            f"{root} holds both split folders ({', '.join(splits)}) and class folders "
            f"({', '.join(plain)}); use one layout")
    if splits:
        return splits
    if plain:
        return {None: plain}
    raise SourceLayoutError(
        f"{source_dir}: unknown layout. Expected either "
        f"'train|val|test/NORMAL|PNEUMONIA/<images>' (Kaggle chest_xray layout) or "
        f"'NORMAL|PNEUMONIA/<images>' (folder names case-insensitive); found folders: "
        f"{sorted(p.name for p in source_dir.iterdir() if p.is_dir()) or 'none'}")


def find_sources(source_dir: str | os.PathLike,
                 patient_id_regex: str = DEFAULT_PATIENT_ID_REGEX) -> list[SourceFile]:
    """Every file under the class folders of ``source_dir``, sorted by relpath."""
    source_dir = Path(source_dir).resolve()
    pattern = re.compile(patient_id_regex)
    layout = detect_layout(source_dir)
    files = []
    for split, class_folders in layout.items():
        for label, folder in class_folders.items():
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames.sort()
                for filename in sorted(filenames):
                    path = Path(dirpath) / filename
                    if not path.is_file():
                        continue
                    relpath = path.relative_to(source_dir).as_posix()
                    hidden = filename.startswith(".") or "__MACOSX" in path.parts
                    files.append(SourceFile(
                        path=path,
                        relpath=relpath,
                        label=label,
                        subtype=subtype_from_name(filename, label),
                        patient_id=patient_id_from_name(filename, pattern, relpath),
                        official_split=split,
                        hidden=hidden,
                    ))
    files.sort(key=lambda f: f.relpath)
    if not [f for f in files if not f.hidden]:
        raise SourceLayoutError(f"{source_dir}: the class folders hold no files")
    return files
