"""Each preset on a tiny look-alike of its real layout (file names, CSV columns, DICOM tags)."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_data.sources import presets
from pneumo_data.sources.presets import PresetError
from tests.helpers import make_kaggle_tree, write_image

pytest.importorskip("pydicom")
from pneumo_data.preprocess import PreprocessSpec  # noqa: E402
from pneumo_data.preprocess.dicom import decode_dicom  # noqa: E402
from tests.dicom_files import gradient, jpeg_baseline_dataset, write  # noqa: E402


def write_text(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def outcomes(found):
    files = {f.relpath: "labelled" for f in found.files}
    files.update({u.relpath: u.status for u in found.unused})
    files.update({i.relpath: "ignored" for i in found.ignored})
    return {r.line: r.status for r in found.rows}, files


# ---------------------------------------------------------------- RSNA

@pytest.fixture()
def rsna(tmp_path):
    """The Kaggle download, unpacked one folder down, as the challenge ships it."""
    root = tmp_path / "rsna-pneumonia-detection-challenge"
    write_text(root / "stage_2_train_labels.csv", [
        "patientId,x,y,width,height,Target",
        "0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0",
        "00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1",
        "00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1",
        "00704310-78a8-4b38-8475-49f4573b2dbb,323.0,577.0,160.0,104.0,1",
        "0a0f91dc-6015-4342-b809-d19610854a21,,,,,0",
    ])
    write_text(root / "stage_2_detailed_class_info.csv", [
        "patientId,class", "0004cfab-14fd-4e49-80ba-63a80b6bddd6,No Lung Opacity / Not Normal"])
    views = {"0004cfab-14fd-4e49-80ba-63a80b6bddd6": "PA",
             "00436515-870c-4b36-a041-de91049b9ab4": "AP",
             "00704310-78a8-4b38-8475-49f4573b2dbb": "PA"}
    for k, (pid, view) in enumerate(views.items()):
        write(root / "stage_2_train_images" / f"{pid}.dcm",
              jpeg_baseline_dataset(gradient((64, 64), 0, 255, np.uint8, seed=k),
                                    PatientID=pid, PatientName=pid, ViewPosition=view,
                                    BodyPartExamined="CHEST", SeriesDescription=f"view: {view}"))
    write(root / "stage_2_test_images" / "000924cf-0f8d-42bd-9158-1af53881a557.dcm",
          jpeg_baseline_dataset(gradient((64, 64), 0, 255, np.uint8, seed=9)))
    return tmp_path


def test_rsna_merges_box_rows_and_reads_patient_and_view(rsna):
    assert presets.detect(rsna) == "rsna"
    found = presets.find(rsna)
    assert found.preset == "rsna"
    rows, files = outcomes(found)
    assert rows == {2: "labelled", 3: "labelled", 4: "merged", 5: "labelled", 6: "missing_file"}
    images = "rsna-pneumonia-detection-challenge/stage_2_train_images/"
    assert [(f.relpath[len(images):], f.label, f.view, f.official_split) for f in found.files] \
        == [("0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm", "normal", "PA", None),
            ("00436515-870c-4b36-a041-de91049b9ab4.dcm", "pneumonia", "AP", None),
            ("00704310-78a8-4b38-8475-49f4573b2dbb.dcm", "pneumonia", "PA", None)]
    assert all(f.patient_id == f.path.stem for f in found.files)  # patientId is per image
    assert files["rsna-pneumonia-detection-challenge/stage_2_test_images/"
                 "000924cf-0f8d-42bd-9158-1af53881a557.dcm"] == "unlabelled"
    assert files["rsna-pneumonia-detection-challenge/stage_2_detailed_class_info.csv"] == \
        "ignored"
    # The files are JPEG-baseline DICOMs: they decode, and their tags agree with the CSV.
    pixels, info = decode_dicom(found.files[1].path.read_bytes(), PreprocessSpec(32))
    assert pixels.shape == (32, 32) and info.patient_id == found.files[1].patient_id
    assert info.modality == "CR" and info.decoder == "pillow"


def test_rsna_view_filter_uses_the_dicom_tag(rsna):
    found = presets.find(rsna, "rsna", views=("PA",))
    rows, _ = outcomes(found)
    assert rows[3] == rows[4] == "dropped"
    assert found.rows[1].reason == "view AP not in allowed views PA"
    assert [f.view for f in found.files] == ["PA", "PA"]


# ---------------------------------------------------------------- NIH

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


@pytest.fixture()
def nih(tmp_path):
    write_text(tmp_path / "Data_Entry_2017.csv", [
        NIH_HEADER,
        "00000001_000.png,Cardiomegaly|Pneumonia,0,1,58,M,PA,2682,2749,0.143,0.143,",
        "00000001_001.png,No Finding,1,1,58,M,AP,2894,2729,0.143,0.143,",
        "00000002_000.png,Effusion,0,2,81,F,PA,2500,2048,0.168,0.168,",
        "00000003_000.png,Pneumonia,0,3,74,F,PA,2500,2048,0.168,0.168,",
        "00000003_001.png,No Finding,1,3,75,F,PA,2048,2500,0.168,0.168,",
        "00000004_000.png,No Finding,0,4,82,M,AP,2048,2500,0.171,0.171,",
    ])
    write_text(tmp_path / "train_val_list.txt",
               ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000004_000.png"])
    write_text(tmp_path / "test_list.txt", ["00000003_000.png", "00000003_001.png"])
    write_image(tmp_path / "images_001" / "images" / "00000001_000.png", seed=1)
    write_image(tmp_path / "images_001" / "images" / "00000001_001.png", seed=2)
    write_image(tmp_path / "images_001" / "images" / "00000002_000.png", seed=3)
    write_image(tmp_path / "images_002" / "images" / "00000003_000.png", seed=4)
    write_image(tmp_path / "images_002" / "images" / "00000003_001.png", seed=5)
    return tmp_path


def test_nih_multi_label_patients_views_and_official_test(nih):
    assert presets.detect(nih) == "nih"
    found = presets.find(nih)
    rows, files = outcomes(found)
    assert rows == {2: "labelled", 3: "labelled", 4: "labelled", 5: "labelled", 6: "labelled",
                    7: "missing_file"}
    assert [(f.relpath, f.label, f.patient_id, f.view, f.official_split)
            for f in found.files] == [
        ("images_001/images/00000001_000.png", "pneumonia", "1", "PA", "train"),
        ("images_001/images/00000001_001.png", "normal", "1", "AP", "train"),
        ("images_001/images/00000002_000.png", "normal", "2", "PA", "train"),
        ("images_002/images/00000003_000.png", "pneumonia", "3", "PA", "test"),
        ("images_002/images/00000003_001.png", "normal", "3", "PA", "test")]
    assert files["test_list.txt"] == files["Data_Entry_2017.csv"] == "ignored"


def test_nih_no_finding_negatives_drop_other_findings(nih):
    found = presets.find(nih, "nih", negatives="no_finding", views=("PA",))
    rows, files = outcomes(found)
    assert rows[4] == "dropped" and "neither positive" in found.rows[2].reason
    assert rows[3] == "dropped" and found.rows[1].reason == "view AP not in allowed views PA"
    assert files["images_001/images/00000002_000.png"] == "dropped"
    assert [f.relpath[-16:] for f in found.files] == [
        "00000001_000.png", "00000003_000.png", "00000003_001.png"]


def test_nih_v2020_file_name_and_box_layout(tmp_path):
    write_text(tmp_path / "Data_Entry_2017_v2020.csv", [
        NIH_HEADER.rstrip(","), "00000009_000.png,Pneumonia,0,9,40,M,PA,2048,2048,0.14,0.14"])
    write_image(tmp_path / "images" / "00000009_000.png")
    found = presets.find(tmp_path)
    assert [(f.relpath, f.label, f.official_split) for f in found.files] == [
        ("images/00000009_000.png", "pneumonia", None)]  # no lists: no official split


# ---------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,"
                   "Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,"
                   "Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
                   "Support Devices")


def chexpert_row(path, frontal, ap_pa, pneumonia):
    cells = [path, "Female", "68", frontal, ap_pa] + [""] * 14
    cells[5 + 7] = pneumonia  # the Pneumonia column
    return ",".join(cells)


@pytest.fixture(params=["CheXpert-v1.0-small", "archive"])
def chexpert(tmp_path, request):
    """CheXpert-v1.0-small as unzipped, and the same under a renamed folder (``archive``)."""
    folder = tmp_path / request.param
    p = "CheXpert-v1.0-small/"
    write_text(folder / "train.csv", [
        CHEXPERT_HEADER,
        chexpert_row(p + "train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP", "1.0"),
        chexpert_row(p + "train/patient00001/study1/view2_lateral.jpg", "Lateral", "", "1.0"),
        chexpert_row(p + "train/patient00002/study1/view1_frontal.jpg", "Frontal", "PA", "-1.0"),
        chexpert_row(p + "train/patient00003/study1/view1_frontal.jpg", "Frontal", "AP", ""),
        chexpert_row(p + "train/patient00004/study2/view1_frontal.jpg", "Frontal", "PA", "0.0"),
    ])
    write_text(folder / "valid.csv", [
        CHEXPERT_HEADER,
        chexpert_row(p + "valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP", "1.0"),
        chexpert_row(p + "valid/patient64542/study1/view1_frontal.jpg", "Frontal", "PA", "0.0"),
    ])
    for k, rel in enumerate(["train/patient00001/study1/view1_frontal.jpg",
                             "train/patient00001/study1/view2_lateral.jpg",
                             "train/patient00002/study1/view1_frontal.jpg",
                             "train/patient00003/study1/view1_frontal.jpg",
                             "train/patient00004/study2/view1_frontal.jpg",
                             "valid/patient64541/study1/view1_frontal.jpg",
                             "valid/patient64542/study1/view1_frontal.jpg"]):
        write_image(folder / rel, seed=k)
    return tmp_path, request.param + "/"


def labelled(found, prefix):
    return {f.relpath[len(prefix):]: (f.label, f.patient_id, f.view, f.official_split)
            for f in found.files}


def test_chexpert_defaults(chexpert):
    root, prefix = chexpert
    assert presets.detect(root) == "chexpert"
    found = presets.find(root)
    assert labelled(found, prefix) == {
        "train/patient00001/study1/view1_frontal.jpg": ("pneumonia", "patient00001", "AP", None),
        "train/patient00003/study1/view1_frontal.jpg": ("normal", "patient00003", "AP", None),
        "train/patient00004/study2/view1_frontal.jpg": ("normal", "patient00004", "PA", None),
        "valid/patient64541/study1/view1_frontal.jpg": ("pneumonia", "patient64541", "AP",
                                                        "test"),
        "valid/patient64542/study1/view1_frontal.jpg": ("normal", "patient64542", "PA", "test")}
    reasons = {(r.table.rsplit("/", 1)[-1], r.line): (r.status, r.reason) for r in found.rows}
    assert reasons[("train.csv", 3)] == (
        "dropped", "view LATERAL not in allowed views AP, FRONTAL, PA")
    assert reasons[("train.csv", 4)] == ("dropped", "Pneumonia='-1.0' is a drop value")


@pytest.mark.parametrize("options,patient2,patient3", [
    (dict(uncertain="zeros"), "normal", "normal"),
    (dict(uncertain="ones"), "pneumonia", "normal"),
    (dict(uncertain="ones", blank="drop"), "pneumonia", None),
])
def test_chexpert_uncertain_and_blank(chexpert, options, patient2, patient3):
    root, prefix = chexpert
    found = labelled(presets.find(root, "chexpert", **options), prefix)
    get = lambda n: found.get(f"train/patient0000{n}/study1/view1_frontal.jpg", (None,))[0]  # noqa
    assert (get(2), get(3)) == (patient2, patient3)


def test_chexpert_all_views_and_pooled_valid(chexpert):
    root, prefix = chexpert
    found = labelled(presets.find(root, "chexpert", views=None, valid_split="pool"), prefix)
    assert found["train/patient00001/study1/view2_lateral.jpg"][2] == "LATERAL"
    assert {v[3] for v in found.values()} == {None}


# ---------------------------------------------------------------- kaggle and detection

def test_kaggle_is_the_default_for_its_folders(tmp_path):
    make_kaggle_tree(tmp_path / "chest_xray", {
        "train": {"NORMAL": ["IM-0001-0001.jpeg"], "PNEUMONIA": ["person1_virus_1.jpeg"]},
        "test": {"NORMAL": ["IM-0002-0001.jpeg"], "PNEUMONIA": ["person2_bacteria_2.jpeg"]}})
    (tmp_path / "chest_xray" / "train" / "NORMAL" / ".DS_Store").write_bytes(b"x")
    found = presets.find(tmp_path)
    assert found.preset == "kaggle"
    assert [(f.label, f.patient_id, f.official_split) for f in found.files
            if f.skip_reason is None] == [
        ("normal", "IM-0002", "test"), ("pneumonia", "person2_bacteria", "test"),
        ("normal", "IM-0001", "train"), ("pneumonia", "person1_virus", "train")]
    hidden = [f.relpath for f in found.files if f.skip_reason]
    assert hidden == ["chest_xray/train/NORMAL/.DS_Store"]
    with pytest.raises(PresetError, match="uncertain.*do not apply to the kaggle"):
        presets.find(tmp_path, uncertain="ones")


def test_options_that_do_not_apply_are_refused(nih):
    with pytest.raises(PresetError, match="uncertain do not apply to preset nih"):
        presets.find(nih, "nih", uncertain="ones")
    with pytest.raises(PresetError, match="negatives must be all or no_finding"):
        presets.find(nih, "nih", negatives="some")


def test_unknown_folder_says_what_each_preset_looks_for(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(PresetError, match="stage_2_train_labels.csv \\(rsna\\).*"
                                          "Data_Entry_2017.csv \\(nih\\).*chexpert"):
        presets.find(tmp_path)
    with pytest.raises(PresetError, match="no stage_2_train_labels.csv"):
        presets.find(tmp_path, "rsna")
