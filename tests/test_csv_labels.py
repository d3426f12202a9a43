"""CSV-labelled sources: every row and every file ends in exactly one recorded outcome."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_data.sources.csv_labels import (
    CsvLabelConfig,
    CsvLabelError,
    LabelTable,
    find_labelled,
    label_of,
    normalise_value,
    parse_values,
)
from tests.helpers import write_image

pytest.importorskip("pydicom")
from tests.dicom_files import gradient, make_dataset, write  # noqa: E402


def statuses(scan):
    """Every file's outcome: labelled, an unused status, or ignored."""
    out = {f.relpath: "labelled" for f in scan.files}
    out.update({u.relpath: u.status for u in scan.unused})
    out.update({i.relpath: "ignored" for i in scan.ignored})
    return out


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("raw,expected", [
    ("1.0", "1"), ("1", "1"), (" -1.0 ", "-1"), ("0.0", "0"), ("", ""), ("nan", ""),
    ("No Finding", "no finding"), ("0.5", "0.5"), ("PNEUMONIA", "pneumonia")])
def test_normalise_value(raw, expected):
    assert normalise_value(raw) == expected


def test_label_rules():
    rest = CsvLabelConfig((LabelTable("x.csv"),), "p", "Finding", ("Pneumonia",),
                          drop_values=("Uncertain",), separator="|")
    assert label_of("Atelectasis|Pneumonia", rest) == ("pneumonia", None)
    assert label_of("Pneumonia|Uncertain", rest) == ("pneumonia", None)  # positive wins
    assert label_of("Effusion", rest) == ("normal", None)                # everything else
    assert label_of("", rest) == ("normal", None)
    assert label_of("Effusion|Uncertain", rest)[1] == "Finding='Effusion|Uncertain' is a drop value"
    strict = CsvLabelConfig((LabelTable("x.csv"),), "p", "Finding", ("Pneumonia",),
                            negative_values=("No Finding",), separator="|")
    assert label_of("no finding", strict) == ("normal", None)
    assert "neither positive (Pneumonia) nor negative (No Finding)" in label_of("Effusion",
                                                                                 strict)[1]


def test_parse_values_for_flags():
    assert parse_values("1, -1,<blank>") == ("1", "-1", "")
    assert parse_values(None) is None
    assert parse_values(["a", " b "]) == ("a", "b")


def test_config_validation():
    with pytest.raises(CsvLabelError, match="both positive and in drop_values"):
        CsvLabelConfig((LabelTable("x.csv"),), "p", "l", ("1.0",), drop_values=("1",)).validate()
    with pytest.raises(CsvLabelError, match="path_template"):
        CsvLabelConfig((LabelTable("x.csv"),), "p", "l", path_template="x.dcm").validate()


@pytest.fixture()
def source(tmp_path):
    """A hospital-export-like folder: PNG/JPEG/DICOM files, one labels CSV, stray files."""
    for name in ("a.png", "b.png", "f.png", "g.png", "h.png", "unlisted.png"):
        write_image(tmp_path / "img" / name, seed=len(name) + ord(name[0]))
    write_image(tmp_path / "img" / "c.jpg", seed=3)
    write(tmp_path / "img" / "d.dcm", make_dataset(gradient((16, 16)), bits_stored=12,
                                                   PatientID="DCM-7", ViewPosition="AP"))
    write(tmp_path / "img" / "k.dcm", make_dataset(gradient((16, 16)), bits_stored=12,
                                                   PatientID="DCM-8", ViewPosition="LL"))
    (tmp_path / "img" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "README.txt").write_text("export notes")
    write_csv(tmp_path / "labels.csv", "file,finding,patient,view", [
        "img/a.png,Pneumonia,p1,PA",              # 2 conflicting (see 7)
        "img/b.png,No Finding,p2,PA",             # 3 labelled
        "img/c.jpg,Atelectasis|Pneumonia,,pa",    # 4 labelled, patient from the file itself
        "img/missing.png,No Finding,p3,PA",       # 5 missing file
        "img/b.png,No Finding,p2,PA",             # 6 duplicate of 3
        "img/a.png,No Finding,p1,PA",             # 7 conflicting with 2
        "img/f.png,Uncertain,p4,PA",              # 8 dropped: drop value
        "img/g.png,Effusion,p5,PA",               # 9 dropped: neither
        "img/h.png,No Finding,p6,LATERAL",        # 10 dropped: view
        ",No Finding,p7,PA",                      # 11 dropped: empty path
        "img/d.dcm,No Finding,,",                 # 12 labelled: patient and view from DICOM
        "img/k.dcm,Pneumonia,,",                  # 13 dropped: DICOM view LL
        "img/b.png,No Finding,p2,AP",             # 14 duplicate (differs, unique mode)
    ])
    return tmp_path


def config(**overrides):
    values = dict(tables=(LabelTable("labels.csv"),), path_column="file",
                  label_column="finding", patient_column="patient", view_columns=("view",),
                  positive_values=("Pneumonia",), negative_values=("No Finding",),
                  drop_values=("Uncertain",), separator="|", views=("PA", "AP"))
    values.update(overrides)
    return CsvLabelConfig(**values)


def test_every_row_and_file_has_one_outcome(source):
    found = find_labelled(source, config())
    rows = {r.line: (r.status, r.path) for r in found.rows}
    assert rows == {
        2: ("conflicting_labels", "img/a.png"), 3: ("labelled", "img/b.png"),
        4: ("labelled", "img/c.jpg"), 5: ("missing_file", "img/missing.png"),
        6: ("duplicate_row", "img/b.png"), 7: ("conflicting_labels", "img/a.png"),
        8: ("dropped", "img/f.png"), 9: ("dropped", "img/g.png"), 10: ("dropped", "img/h.png"),
        11: ("dropped", None), 12: ("labelled", "img/d.dcm"), 13: ("dropped", "img/k.dcm"),
        14: ("duplicate_row", "img/b.png")}
    reasons = {r.line: r.reason for r in found.rows}
    assert "is a drop value" in reasons[8]
    assert "neither positive" in reasons[9]
    assert reasons[10] == "view LATERAL not in allowed views AP, PA"
    assert reasons[11] == "empty 'file'"
    assert reasons[13] == "view LL not in allowed views AP, PA"
    assert reasons[6] == "repeats labels.csv:3"
    assert reasons[14] == "the file is already labelled at labels.csv:3"
    assert "pneumonia at labels.csv:2; normal at labels.csv:7" in reasons[2]

    files = statuses(found)
    assert files == {
        "img/a.png": "conflicting_labels", "img/b.png": "labelled", "img/c.jpg": "labelled",
        "img/d.dcm": "labelled", "img/f.png": "dropped", "img/g.png": "dropped",
        "img/h.png": "dropped", "img/k.dcm": "dropped", "img/unlisted.png": "unlabelled",
        "img/.DS_Store": "ignored", "labels.csv": "ignored", "README.txt": "ignored"}
    assert found.summary() == {
        "rows": {"conflicting_labels": 2, "labelled": 3, "missing_file": 1, "duplicate_row": 2,
                 "dropped": 5},
        "files": {"conflicting_labels": 1, "labelled": 3, "dropped": 4, "unlabelled": 1,
                  "ignored": 3}}

    by_path = {f.relpath: f for f in found.files}
    assert [(f.label, f.patient_id, f.view, f.origin) for f in found.files] == [
        ("normal", "p2", "PA", "labels.csv:3"),
        ("pneumonia", "file:img/c.jpg", "PA", "labels.csv:4"),
        ("normal", "DCM-7", "AP", "labels.csv:12")]
    assert by_path["img/c.jpg"].subtype == "unknown" and by_path["img/b.png"].subtype == "none"
    assert by_path["img/b.png"].path == source / "img" / "b.png"
    assert all(f.official_split is None for f in found.files)


def test_merge_mode_merges_rows_of_one_file(source):
    found = find_labelled(source, config(multiple_rows="merge"))
    rows = {r.line: r.status for r in found.rows}
    assert rows[6] == "duplicate_row"  # all cells equal: still a duplicate
    assert rows[14] == "merged"


def test_without_view_filter_and_with_everything_else_negative(source):
    found = find_labelled(source, config(views=None, negative_values=None))
    labelled = {f.relpath: f.label for f in found.files}
    assert labelled["img/g.png"] == "normal"      # Effusion is "everything else"
    assert labelled["img/h.png"] == "normal"      # LATERAL allowed now
    assert labelled["img/k.dcm"] == "pneumonia"   # DICOM view LL allowed now
    assert "img/f.png" not in labelled            # still a drop value


def test_missing_column_names_the_columns_found(source):
    with pytest.raises(CsvLabelError, match="no column 'label'; its columns are 'file', "
                                            "'finding', 'patient', 'view'"):
        find_labelled(source, config(label_column="label"))


def test_missing_table(source):
    with pytest.raises(CsvLabelError, match="labels CSV .*nope.csv does not exist"):
        find_labelled(source, config(tables=(LabelTable("nope.csv"),)))


def test_basename_lookup_and_ambiguous_names(tmp_path):
    write_image(tmp_path / "part1" / "x.png")
    write_image(tmp_path / "part2" / "y.png")
    write_image(tmp_path / "copy" / "y.png", seed=4)
    write_csv(tmp_path / "t.csv", "name,label", ["x.png,1", "y.png,0"])
    found = find_labelled(tmp_path, CsvLabelConfig(
        (LabelTable("t.csv"),), "name", "label", path_lookup="basename"))
    assert [(f.relpath, f.label) for f in found.files] == [("part1/x.png", "pneumonia")]
    row = found.rows[1]
    assert row.status == "dropped" and row.reason.startswith("ambiguous file name: 2 files")
    assert statuses(found)["copy/y.png"] == "unlabelled"


def test_label_values_compare_numerically(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png", seed=2)
    write_csv(tmp_path / "t.csv", "path,y", ["a.png,1.0", "b.png,0.0"])
    found = find_labelled(tmp_path, CsvLabelConfig((LabelTable("t.csv"),), "path", "y",
                                                   ("1",), ("0",)))
    assert [f.label for f in found.files] == ["pneumonia", "normal"]
    assert np.all([f.patient_id.startswith("file:") for f in found.files])
