"""``SourceConfig``: how prepare reads a source folder (preset, label tables, label rules, views).

A group of :class:`pneumo_data.prepare.PrepareConfig`; every field is a flat flag
(``--preset``, ``--labels_csv``, ...). TF-free, like every config module.
"""

from __future__ import annotations

import dataclasses

from pneumo_data.common.config import option

PRESET_CHOICES = ("auto", "kaggle", "rsna", "nih", "chexpert", "csv")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where labels, patients and views come from. Each field is also a command-line flag."""

    preset: str = option(
        "auto", "Source layout: kaggle (NORMAL/PNEUMONIA folders), rsna, nih, chexpert, or csv "
                "(any folder + --labels_csv). auto: detected from the folder (csv when "
                "--labels_csv is given).", choices=PRESET_CHOICES)
    dataset_name: str | None = option(
        None, "Name of the dataset in manifests and evaluation reports (default: the preset "
              "name, or the source folder's name for kaggle and csv).")
    # -- generic CSV (--preset=csv); when given with a named preset, each overrides its value
    labels_csv: str | None = option(
        None, "Label table(s), comma-separated, relative to --source_dir (or absolute); "
              "TABLE:test keeps that table's rows as the official test split.")
    path_column: str | None = option(None, "CSV column naming the image file.")
    label_column: str | None = option(None, "CSV column holding the label value(s).")
    patient_column: str | None = option(
        None, "CSV column with the patient id (else --patient_id_regex when changed, else the "
              "DICOM PatientID tag, else one patient per file).")
    positive_values: str | None = option(
        None, "Label values meaning pneumonia, comma-separated (csv default: 1). <blank> names "
              "the empty cell.")
    negative_values: str | None = option(
        None, "Values meaning not pneumonia (default: every value that is neither positive "
              "nor dropped).")
    drop_values: str | None = option(
        None, "Values whose rows are dropped (e.g. -1 for uncertain), comma-separated.")
    label_separator: str | None = option(
        None, "Separator of multi-label cells (e.g. '|' for 'Atelectasis|Pneumonia').")
    view_column: str | None = option(
        None, "CSV column(s) with the view (PA, AP, ...), comma-separated: the first non-empty "
              "counts (else the DICOM ViewPosition tag).")
    path_template: str | None = option(
        None, "Template turning the path cell into a file path, e.g. '{}.dcm' (csv default: "
              "'{}').")
    path_lookup: str | None = option(
        None, "relative: the path cell is relative to --source_dir; basename: a file name "
              "found anywhere under it (csv default: relative).",
        choices=("relative", "basename"))
    multiple_rows: str | None = option(
        None, "unique: a second row for a file is a duplicate; merge: rows of one file with "
              "the same label are one label (boxes). csv default: unique.",
        choices=("unique", "merge"))
    test_list: str | None = option(
        None, "A text file of image names (one a line, like NIH's test_list.txt) kept as the "
              "official test split.")
    dicom_tags: bool = option(
        True, "--preset=csv: read PatientID and ViewPosition from DICOM headers when the CSV "
              "has none.")
    views: str | None = option(
        None, "Allowed views, comma-separated (e.g. PA,AP); others, and unknown views, are "
              "dropped. 'all' keeps every view (chexpert's default is AP,PA,FRONTAL).")
    # -- preset knobs (refused by presets that do not take them)
    uncertain: str = option(
        "ignore", "chexpert: uncertain (-1) labels are dropped (ignore), negative (zeros) or "
                  "positive (ones).", choices=("ignore", "zeros", "ones"))
    blank: str = option(
        "negative", "chexpert: a blank Pneumonia cell is negative or dropped (drop).",
        choices=("negative", "drop"))
    negatives: str = option(
        "all", "nih: negatives are every image without Pneumonia (all) or only 'No Finding' "
               "images (no_finding; images with other findings are dropped).",
        choices=("all", "no_finding"))
    chexpert_valid: str = option(
        "test", "chexpert: valid.csv (radiologist labels) is the test split (test) or pooled "
                "with train (pool).", choices=("test", "pool"))
