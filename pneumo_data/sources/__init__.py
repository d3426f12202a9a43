"""Stage 1 of ingest: find the source files, their labels, patients and views.

Readers, one module each:

* :mod:`.kaggle`: the Kaggle folder layout ``{train,val,test}/{NORMAL,PNEUMONIA}`` (labels
  from folder names, patients from file names);
* :mod:`.csv_labels`: images anywhere under the folder, labels (and patients, views) in CSV
  tables, every row and every file accounted for;
* :mod:`.dicom_tags`: patient id and view position from DICOM headers when a table has none;
* :mod:`.presets`: the layouts and label rules of public collections (``rsna``, ``nih``,
  ``chexpert``; ``kaggle`` is the default when the folders look like it).

:func:`scan` reads a folder the way prepare's :class:`SourceConfig` says; :func:`scan_sources`
and :func:`find_sources` read the Kaggle layout as before.
"""

from __future__ import annotations

import dataclasses
import os

import pneumo_data.sources.presets as presets
from pneumo_data.common.errors import UserError
from pneumo_data.sources.base import (
    CLASSES,
    OFFICIAL_SPLITS,
    FileOutcome,
    Ignored,
    RowOutcome,
    SourceFile,
    SourceLayoutError,
    SourceScan,
)
from pneumo_data.sources.config import PRESET_CHOICES, SourceConfig
from pneumo_data.sources.csv_labels import CsvLabelConfig, LabelTable, parse_values
from pneumo_data.sources.kaggle import (
    DEFAULT_PATIENT_ID_REGEX,
    detect_layout,
    find_sources,
    patient_id_from_name,
    scan_sources,
    subtype_from_name,
)

__all__ = ["CLASSES", "OFFICIAL_SPLITS", "DEFAULT_PATIENT_ID_REGEX", "FileOutcome", "Ignored",
           "RowOutcome", "SourceConfig", "SourceFile", "SourceLayoutError", "SourceScan",
           "PRESET_CHOICES", "SourceOptionError", "detect_layout", "find_sources",
           "patient_id_from_name", "scan", "scan_sources", "subtype_from_name", "csv_config"]


class SourceOptionError(UserError):
    """Source options that contradict each other or do not apply to the chosen preset."""


_KNOB_DEFAULTS = {"uncertain": "ignore", "blank": "negative", "negatives": "all",
                  "chexpert_valid": "test"}
_KNOB_NAMES = {"chexpert_valid": "valid_split"}  # flag name -> preset builder argument


def _tables(text: str):
    tables = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        path, _, split = item.rpartition(":") if item.rsplit(":", 1)[-1] in (
            "train", "val", "test") else (item, "", None)
        tables.append(LabelTable(path, split or None))
    return tuple(tables)


def _views(config: SourceConfig) -> tuple[str, ...] | None | str:
    """The --views value: a tuple, ``None`` (all), or ``"default"`` (the preset's own)."""
    if config.views is None:
        return "default"
    if config.views.strip().lower() == "all":
        return None
    views = tuple(v.upper() for v in parse_values(config.views))
    if not views:
        raise SourceOptionError("--views is empty; give views such as PA,AP or 'all'")
    return views


def _overrides(config: SourceConfig, patient_id_regex: str) -> dict:
    """CsvLabelConfig fields the generic flags set (only those given)."""
    out = {}
    for flag, field in (("path_column", "path_column"), ("label_column", "label_column"),
                        ("patient_column", "patient_column"), ("label_separator", "separator"),
                        ("path_template", "path_template"), ("path_lookup", "path_lookup"),
                        ("multiple_rows", "multiple_rows")):
        value = getattr(config, flag)
        if value is not None:
            out[field] = value
    for flag in ("positive_values", "negative_values", "drop_values"):
        value = getattr(config, flag)
        if value is not None:
            out[flag] = parse_values(value)
    if config.view_column is not None:
        out["view_columns"] = parse_values(config.view_column)
    if patient_id_regex != DEFAULT_PATIENT_ID_REGEX:
        out["patient_regex"] = patient_id_regex
    views = _views(config)
    if views != "default":
        out["views"] = views
    return out


def csv_config(config: SourceConfig, patient_id_regex: str = DEFAULT_PATIENT_ID_REGEX):
    """The :class:`~pneumo_data.sources.csv_labels.CsvLabelConfig` of ``--preset=csv``."""
    if not config.labels_csv:
        raise SourceOptionError("--preset=csv needs --labels_csv (and --path_column, "
                                "--label_column)")
    missing = [f"--{n}" for n in ("path_column", "label_column") if not getattr(config, n)]
    if missing:
        raise SourceOptionError(f"--preset=csv needs {' and '.join(missing)}")
    knobs = [k for k, v in _KNOB_DEFAULTS.items() if getattr(config, k) != v]
    if knobs:
        raise SourceOptionError(f"--{', --'.join(knobs)} only apply to a named preset, not "
                                f"to --preset=csv")
    values = _overrides(config, patient_id_regex)
    values.setdefault("views", None)
    split_lists = (("test", config.test_list),) if config.test_list else ()
    return CsvLabelConfig(tables=_tables(config.labels_csv), split_lists=split_lists,
                          dicom_tags=config.dicom_tags, **values)


def scan(source_dir: str | os.PathLike, config: SourceConfig | None = None,
         patient_id_regex: str = DEFAULT_PATIENT_ID_REGEX) -> SourceScan:
    """Reads ``source_dir`` as ``config`` says (default: detect the preset).

    Raises:
      SourceOptionError, presets.PresetError, csv_labels.CsvLabelError, SourceLayoutError:
        the folder or the options are unusable; the message says why.
    """
    config = config or SourceConfig()
    preset = config.preset
    if preset == "auto" and config.labels_csv:
        preset = "csv"
    if preset == "csv":
        return presets.find_csv(source_dir, csv_config(config, patient_id_regex), "csv")
    name = presets.detect(source_dir) if preset == "auto" else preset
    if config.labels_csv:
        raise SourceOptionError(f"--labels_csv is for --preset=csv; preset {name} finds its "
                                f"own tables")
    knobs = {_KNOB_NAMES.get(k, k): getattr(config, k) for k, v in _KNOB_DEFAULTS.items()
             if getattr(config, k) != v}
    overrides = _overrides(config, patient_id_regex)
    if name == "kaggle":
        given = sorted({*knobs, *overrides} - {"patient_regex"})
        if given or config.test_list:
            raise SourceOptionError(
                f"option(s) {', '.join(given or ['test_list'])} do not apply to the kaggle "
                f"folder layout (labels come from the folder names)")
        return presets.find(source_dir, "kaggle", patient_id_regex)
    views = overrides.pop("views", "default")
    if views != "default":
        knobs["views"] = views
    _, csv = presets.config_for(source_dir, name, **knobs)
    if config.test_list:
        csv = dataclasses.replace(csv, split_lists=(
            ("test", config.test_list),
            *[(s, f) for s, f in csv.split_lists if s != "test"]))
    if overrides:
        csv = dataclasses.replace(csv, **overrides)
    return presets.find_csv(source_dir, csv, name)
