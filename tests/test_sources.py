import re

import pytest

from pneumo_data import sources
from tests.helpers import make_kaggle_tree, write_image


@pytest.mark.parametrize("name,expected", [
    ("person1_bacteria_1.jpeg", "person1_bacteria"),
    ("person1_virus_6.jpeg", "person1_virus"),
    ("IM-0001-0001.jpeg", "IM-0001"),
    ("NORMAL2-IM-0001-0001.jpeg", "NORMAL2-IM-0001"),
    ("scan.png", "file:x/scan.png"),
])
def test_patient_ids_keep_series_and_subtype(name, expected):
    pattern = re.compile(sources.DEFAULT_PATIENT_ID_REGEX)
    assert sources.patient_id_from_name(name, pattern, "x/" + name) == expected


def test_subtypes():
    assert sources.subtype_from_name("person3_virus_9.jpeg", "pneumonia") == "viral"
    assert sources.subtype_from_name("person3_bacteria_9.jpeg", "pneumonia") == "bacterial"
    assert sources.subtype_from_name("x.jpeg", "pneumonia") == "unknown"
    assert sources.subtype_from_name("IM-0001-0001.jpeg", "normal") == "none"


def test_kaggle_layout_nested_and_case_insensitive(tmp_path):
    make_kaggle_tree(tmp_path / "chest_xray", {
        "Train": {"Normal": ["IM-0001-0001.jpeg"], "PNEUMONIA": ["person1_virus_1.jpeg"]},
        "test": {"normal": ["IM-0002-0001.jpeg"], "pneumonia": ["person2_bacteria_2.jpeg"]},
    })
    (tmp_path / "chest_xray" / "Train" / "Normal" / ".DS_Store").write_bytes(b"junk")
    found = sources.find_sources(tmp_path)
    by_path = {f.relpath: f for f in found}
    assert set(by_path) == {
        "chest_xray/Train/Normal/IM-0001-0001.jpeg", "chest_xray/Train/Normal/.DS_Store",
        "chest_xray/Train/PNEUMONIA/person1_virus_1.jpeg",
        "chest_xray/test/normal/IM-0002-0001.jpeg",
        "chest_xray/test/pneumonia/person2_bacteria_2.jpeg"}
    assert by_path["chest_xray/Train/Normal/.DS_Store"].skip_reason.startswith("hidden file")
    f = by_path["chest_xray/Train/PNEUMONIA/person1_virus_1.jpeg"]
    assert (f.label, f.subtype, f.patient_id, f.official_split) == (
        "pneumonia", "viral", "person1_virus", "train")


def test_plain_layout_has_no_official_split(tmp_path):
    write_image(tmp_path / "NORMAL" / "a.png")
    write_image(tmp_path / "PNEUMONIA" / "sub" / "b.png")
    found = sources.find_sources(tmp_path)
    assert [(f.relpath, f.official_split) for f in found] == [
        ("NORMAL/a.png", None), ("PNEUMONIA/sub/b.png", None)]


def test_unknown_layout_says_what_was_expected(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(sources.SourceLayoutError, match="NORMAL|PNEUMONIA"):
        sources.find_sources(tmp_path)


def test_missing_folder_and_empty_classes(tmp_path):
    with pytest.raises(sources.SourceLayoutError, match="does not exist"):
        sources.find_sources(tmp_path / "nope")
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "PNEUMONIA").mkdir()
    with pytest.raises(sources.SourceLayoutError, match="no files"):
        sources.find_sources(tmp_path)


def test_mixed_layout_is_refused(tmp_path):
    write_image(tmp_path / "NORMAL" / "a.png")
    write_image(tmp_path / "train" / "NORMAL" / "b.png")
    with pytest.raises(sources.SourceLayoutError, match="one layout"):
        sources.find_sources(tmp_path)


def test_dicom_files_in_class_folders_get_patient_and_view_from_their_tags(tmp_path):
    pytest.importorskip("pydicom")
    import numpy as np

    from tests.dicom_files import make_dataset, write
    for cls, patient, view in (("NORMAL", "H-17", "AP"), ("PNEUMONIA", "H-18", "PA")):
        write(tmp_path / cls / "scan1.dcm", make_dataset(np.zeros((8, 8), np.uint8),
                                                          PatientID=patient, ViewPosition=view))
    write_image(tmp_path / "NORMAL" / "IM-0001-0001.jpeg")
    found = {f.relpath: (f.patient_id, f.view) for f in sources.find_sources(tmp_path)}
    assert found == {"NORMAL/scan1.dcm": ("H-17", "AP"), "PNEUMONIA/scan1.dcm": ("H-18", "PA"),
                     "NORMAL/IM-0001-0001.jpeg": ("IM-0001", None)}
