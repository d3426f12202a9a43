r"""Presets: the options that read each public chest X-ray collection as it is downloaded.

A preset is a *layout finder* (where the label tables, split lists and images are under
``source_dir``, also when the download sits one folder down) plus the label rules, returning a
:class:`pneumo_data.sources.csv_labels.CsvLabelConfig`. ``find(source_dir, preset)`` runs it and
gives a :class:`pneumo_data.sources.SourceScan` (files + the account of every row and file).
``kaggle`` is the folder layout read by :func:`pneumo_data.sources.kaggle.scan_sources`.

``rsna`` -- RSNA Pneumonia Detection Challenge (Kaggle, 2018)
    ``stage_2_train_labels.csv``: ``patientId,x,y,width,height,Target``, one row per box, so a
    positive image has several rows (all ``Target`` 1, merged here) and a negative image one row
    with empty box cells. Images ``stage_2_train_images/<patientId>.dcm``: 8-bit MONOCHROME2
    1024x1024 secondary captures in JPEG Baseline whose DICOM tags carry ``PatientID`` (equal to
    ``patientId``), ``ViewPosition`` (PA/AP), ``Modality`` CR, ``BodyPartExamined`` CHEST.
    ``stage_2_test_images/`` has no labels: reported as unlabelled. Label: ``Target`` 1 is
    pneumonia, 0 is not (0 covers both "Normal" and "No Lung Opacity / Not Normal" of
    ``stage_2_detailed_class_info.csv``, which this preset does not read). Each patientId is one
    image, so patient grouping is per image: the challenge files do not say which images share a
    person. No official test labels: everything is split by ``prepare``.
    Sources: the challenge data page (kaggle.com/c/rsna-pneumonia-detection-challenge/data) as
    summarised in public EDAs, and a pydicom dump of a training file (JPEG Baseline, tags above).

``nih`` -- NIH ChestX-ray14 (Wang et al. 2017; nihcc.app.box.com/v/ChestXray-NIHCC)
    ``Data_Entry_2017.csv`` (or the re-issued ``Data_Entry_2017_v2020.csv``): ``Image Index``
    (file name such as ``00000001_000.png``), ``Finding Labels`` (``No Finding`` or findings
    joined by ``|``, e.g. ``Cardiomegaly|Pneumonia``), ``Follow-up #``, ``Patient ID``, ``Patient
    Age``, ``Patient Gender``, ``View Position`` (PA/AP), original size and spacing. PNGs in
    ``images/`` (Box tarballs) or ``images_001/images/`` .. ``images_012/images/`` (Kaggle); the
    file name is looked up anywhere under source_dir. ``test_list.txt`` / ``train_val_list.txt``:
    the official patient-wise split; listed test images are the test split (kept, like Kaggle's
    test folder), train_val images are pooled and re-split by patient. Label: any ``Pneumonia``
    is positive; negatives are every other image (``negatives="all"``, CheXNet's convention:
    "all other images") or only ``No Finding`` images (``negatives="no_finding"``: pneumonia vs
    normal, the Kermany task; images with other findings are then dropped).

``chexpert`` -- CheXpert v1.0 (Irvin et al. 2019), full or ``-small``
    ``train.csv`` / ``valid.csv`` with ``Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,
    Pneumonia,...``; ``Path`` like ``CheXpert-v1.0-small/train/patient00001/study1/
    view1_frontal.jpg``, relative to the folder holding ``CheXpert-v1.0-small/`` (the prefix is
    stripped and the path re-rooted at the CSV's folder, so a renamed folder still works).
    ``Pneumonia`` is ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain, blank unmentioned
    (TFDS's chexpert builder names the four values so). ``uncertain``: ``ignore`` (drop the row,
    default; the paper's U-Ignore), ``zeros`` (negative), ``ones`` (positive). ``blank``:
    ``negative`` (default: a report that does not mention pneumonia is read as no pneumonia, as
    most CheXpert training code does) or ``drop``. Patient id from the path (``patientNNNNN``).
    View: ``AP/PA`` when filled, else ``Frontal/Lateral`` (``LATERAL``); default views
    ``AP, PA, FRONTAL`` keep frontal images only (``views=None`` keeps laterals too).
    ``valid.csv`` (234 images of 200 studies, labelled by a consensus of 3 radiologists; no
    uncertain values) is the **test** split by default (``valid_split="test"``): it is the only
    radiologist-labelled set released (the 500-study test set is hidden), so it is where the
    honest number comes from; ``train.csv`` (report-mined labels) is split into train/val by
    patient. It holds few pneumonia positives: read its confidence interval.
    ``valid_split="pool"`` pools it with train instead.

``kaggle`` -- Kermany et al. 2018 as on Kaggle: ``{train,val,test}/{NORMAL,PNEUMONIA}``; the
    default when the folders look like it.
"""

from __future__ import annotations

import csv
import inspect
from pathlib import Path
from typing import Any

import pneumo_data.sources.csv_labels as csv_labels
import pneumo_data.sources.kaggle as kaggle
from pneumo_data.common.errors import UserError
from pneumo_data.sources.base import SourceLayoutError, SourceScan
from pneumo_data.sources.csv_labels import CsvLabelConfig, CsvLabelError, LabelTable

__all__ = ["PRESETS", "PresetError", "detect", "config_for", "find"]

PRESETS = ("kaggle", "rsna", "nih", "chexpert")

CHEXPERT_PREFIXES = ("CheXpert-v1.0-small/", "CheXpert-v1.0/")
CHEXPERT_FRONTAL = ("AP", "PA", "FRONTAL")


class PresetError(UserError):
    """The folder does not look like the preset's layout, or an option does not apply."""


# ---------------------------------------------------------------- finding files

def _locate(source_dir: Path, names: tuple[str, ...]) -> Path | None:
    """``source_dir/name`` or ``source_dir/<child>/name`` for the first name found."""
    for name in names:
        if (source_dir / name).is_file():
            return source_dir / name
    children = sorted(p for p in source_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    for child in children:
        for name in names:
            if (child / name).is_file():
                return child / name
    return None


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return next(csv.reader(handle), [])


def _prefix(source_dir: Path, folder: Path) -> str:
    rel = folder.relative_to(source_dir).as_posix()
    return "" if rel == "." else rel + "/"


def _rel(source_dir: Path, path: Path) -> str:
    return path.relative_to(source_dir).as_posix()


_RSNA_LABELS = ("stage_2_train_labels.csv", "stage_1_train_labels.csv")
_NIH_LABELS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")


def _chexpert_tables(source_dir: Path) -> list[Path]:
    found = []
    for folder in [source_dir, *(source_dir / p.rstrip("/") for p in CHEXPERT_PREFIXES),
                   *sorted(p for p in source_dir.iterdir() if p.is_dir())]:
        for name in ("train.csv", "valid.csv"):
            path = folder / name
            if path.is_file() and path not in found and \
                    {"Path", "Frontal/Lateral", "Pneumonia"} <= set(_header(path)):
                found.append(path)
        if found:
            return found
    return found


# ---------------------------------------------------------------- presets

def rsna_config(source_dir: Path, views: tuple[str, ...] | None = None) -> CsvLabelConfig:
    labels = _locate(source_dir, _RSNA_LABELS)
    if labels is None:
        raise PresetError(f"{source_dir}: no {' or '.join(_RSNA_LABELS)} (RSNA layout)")
    stage = labels.name.split("_train_labels")[0]
    images = labels.parent / f"{stage}_train_images"
    if not images.is_dir():
        raise PresetError(f"{labels.parent}: no {images.name}/ folder next to {labels.name}")
    return CsvLabelConfig(
        tables=(LabelTable(_rel(source_dir, labels), None, _prefix(source_dir, images)),),
        path_column="patientId", label_column="Target",
        positive_values=("1",), negative_values=("0",),
        patient_column="patientId", path_template="{}.dcm", multiple_rows="merge",
        dicom_tags=True, views=views)


def nih_config(source_dir: Path, negatives: str = "all",
               views: tuple[str, ...] | None = None) -> CsvLabelConfig:
    if negatives not in ("all", "no_finding"):
        raise PresetError(f"negatives must be all or no_finding, got {negatives!r}")
    labels = _locate(source_dir, _NIH_LABELS)
    if labels is None:
        raise PresetError(f"{source_dir}: no {' or '.join(_NIH_LABELS)} (NIH ChestX-ray14)")
    lists = tuple((split, _rel(source_dir, labels.parent / name))
                  for split, name in (("test", "test_list.txt"), ("train", "train_val_list.txt"))
                  if (labels.parent / name).is_file())
    return CsvLabelConfig(
        tables=(LabelTable(_rel(source_dir, labels)),),
        path_column="Image Index", label_column="Finding Labels", separator="|",
        positive_values=("Pneumonia",),
        negative_values=None if negatives == "all" else ("No Finding",),
        patient_column="Patient ID", view_columns=("View Position",), views=views,
        path_lookup="basename", split_lists=lists, dicom_tags=False)


def chexpert_config(source_dir: Path, uncertain: str = "ignore", blank: str = "negative",
                    views: tuple[str, ...] | None = CHEXPERT_FRONTAL,
                    valid_split: str = "test") -> CsvLabelConfig:
    if uncertain not in ("ignore", "zeros", "ones"):
        raise PresetError(f"uncertain must be ignore, zeros or ones, got {uncertain!r}")
    if blank not in ("negative", "drop"):
        raise PresetError(f"blank must be negative or drop, got {blank!r}")
    if valid_split not in ("test", "pool"):
        raise PresetError(f"valid_split must be test or pool, got {valid_split!r}")
    tables = _chexpert_tables(source_dir)
    if not tables:
        raise PresetError(f"{source_dir}: no train.csv / valid.csv with Path, Frontal/Lateral "
                          f"and Pneumonia columns (CheXpert layout)")
    positive = ("1",) + (("-1",) if uncertain == "ones" else ())
    negative = ("0",) + (("",) if blank == "negative" else ()) + \
        (("-1",) if uncertain == "zeros" else ())
    drop = (("-1",) if uncertain == "ignore" else ()) + (("",) if blank == "drop" else ())
    return CsvLabelConfig(
        tables=tuple(LabelTable(_rel(source_dir, t),
                                "test" if t.name == "valid.csv" and valid_split == "test"
                                else None,
                                _prefix(source_dir, t.parent)) for t in tables),
        path_column="Path", label_column="Pneumonia",
        positive_values=positive, negative_values=negative, drop_values=drop,
        patient_regex=r"(?:^|/)(patient\d+)/", view_columns=("AP/PA", "Frontal/Lateral"),
        views=views, strip_prefixes=CHEXPERT_PREFIXES, dicom_tags=False)


_BUILDERS = {"rsna": rsna_config, "nih": nih_config, "chexpert": chexpert_config}


def detect(source_dir: str | Path) -> str:
    """The preset whose layout ``source_dir`` has (checked in the order rsna, nih, chexpert,
    kaggle)."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise PresetError(f"source_dir {source_dir} does not exist or is not a folder")
    if _locate(source_dir, _RSNA_LABELS):
        return "rsna"
    if _locate(source_dir, _NIH_LABELS):
        return "nih"
    if _chexpert_tables(source_dir):
        return "chexpert"
    try:
        kaggle.detect_layout(source_dir)
    except SourceLayoutError as error:
        raise PresetError(
            f"{error}\nNor does it hold {_RSNA_LABELS[0]} (rsna), {_NIH_LABELS[1]} (nih) or "
            f"a CheXpert train.csv/valid.csv (chexpert); for other CSV-labelled folders pass "
            f"the labels CSV and its columns.") from None
    return "kaggle"


def config_for(source_dir: str | Path, preset: str = "auto",
               **options: Any) -> tuple[str, CsvLabelConfig | None]:
    """``(preset name, config)``; config is ``None`` for ``kaggle`` (folder labels).

    ``options`` are the preset's own knobs (``views`` for all CSV presets; ``negatives`` for nih;
    ``uncertain``, ``blank``, ``valid_split`` for chexpert); one that does not apply is an error.
    """
    source_dir = Path(source_dir).resolve()
    name = detect(source_dir) if preset == "auto" else preset
    if name not in PRESETS:
        raise PresetError(f"unknown preset {preset!r}; choose one of auto, {', '.join(PRESETS)}")
    if name == "kaggle":
        if options:
            raise PresetError(f"option(s) {', '.join(sorted(options))} do not apply to the "
                              f"kaggle folder layout")
        return name, None
    builder = _BUILDERS[name]
    known = set(list(inspect.signature(builder).parameters)[1:])
    unknown = sorted(set(options) - known)
    if unknown:
        raise PresetError(f"option(s) {', '.join(unknown)} do not apply to preset {name} "
                          f"(it takes {', '.join(sorted(known))})")
    return name, builder(source_dir, **options)


def find(source_dir: str | Path, preset: str = "auto",
         patient_id_regex: str = kaggle.DEFAULT_PATIENT_ID_REGEX, **options: Any) -> SourceScan:
    """Runs a preset: the :class:`SourceScan` (``scan.preset`` names the preset used).

    ``patient_id_regex`` is the Kaggle layout's file-name rule (ignored by CSV presets).

    Raises:
      PresetError: the layout does not match or an option does not apply.
      CsvLabelError: a table lacks a column the preset needs.
    """
    name, config = config_for(source_dir, preset, **options)
    if config is None:
        try:
            return kaggle.scan_sources(source_dir, patient_id_regex)
        except SourceLayoutError as error:
            raise PresetError(str(error)) from None
    return find_csv(source_dir, config, name)


def find_csv(source_dir: str | Path, config: CsvLabelConfig, name: str) -> SourceScan:
    """:func:`csv_labels.find_labelled` with the preset's name in errors and in the scan."""
    try:
        return csv_labels.find_labelled(source_dir, config, preset=name)
    except CsvLabelError as error:
        raise CsvLabelError(f"preset {name}: {error}") from None
