"""prepare end to end on each preset's look-alike: every row and file accounted for, labels,
patients, views and splits in the manifest, DICOM decoded through pneumo_data.preprocess.dicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("pydicom")

from pneumo_data import manifest, records_tf  # noqa: E402
from pneumo_data.common.config import with_leaves  # noqa: E402
from pneumo_data.common.errors import UserError  # noqa: E402
from pneumo_data.prepare import PrepareConfig, PrepareError, prepare  # noqa: E402
from pneumo_data.preprocess import (
    PreprocessSpec,  # noqa: E402
    dicom,  # noqa: E402
)
from pneumo_data.sources import SourceOptionError  # noqa: E402
from pneumo_data.split import LeakageError  # noqa: E402
from tests import source_layouts as layouts  # noqa: E402
from tests.dicom_files import make_dataset, structured_report, write  # noqa: E402
from tests.helpers import run_module


def run(src, out, **leaves):
    leaves.setdefault("image_size", 32)
    leaves.setdefault("progress", False)
    leaves.setdefault("num_workers", 2)
    return prepare(with_leaves(PrepareConfig(), source_dir=str(src), output_dir=str(out),
                               **leaves))


def on_disk(src: Path) -> set[str]:
    return {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}


def accounted(m) -> dict[str, str]:
    """path -> status for every file row and every ignored entry of the manifest."""
    out = {r["path"]: r["status"] for r in m.data["files"]}
    out.update({i["path"]: "ignored" for i in m.data["ignored"]})
    return out


def written(m) -> dict[str, dict]:
    return {r["path"]: r for r in m.data["files"] if r["status"] == "written"}


def assert_patient_disjoint(m):
    split_of = {}
    for r in written(m).values():
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"], r


def records(m, split, label):
    rows = []
    for path in m.shard_paths(split, label):
        for raw in tf.data.TFRecordDataset(path):
            rows.append({k: v.numpy() for k, v in
                         records_tf.parse(raw, m.encoding, m.image_size).items()})
    return rows


# ---------------------------------------------------------------- rsna

def test_rsna_end_to_end(tmp_path):
    expected = layouts.write_rsna(tmp_path / "src" / "rsna-pneumonia-detection-challenge", n=16)
    m = run(tmp_path / "src", tmp_path / "out")  # auto-detected one folder down
    source = m.data["source"]
    assert (source["preset"], source["dataset_name"]) == ("rsna", "rsna")
    assert set(accounted(m)) == on_disk(tmp_path / "src")
    prefix = "rsna-pneumonia-detection-challenge/"
    rows = written(m)
    assert {Path(p).stem for p in rows} == set(expected)
    for path, r in rows.items():
        label, view = expected[Path(path).stem]
        assert (r["label"], r["view"], r["patient_id"]) == (label, view, Path(path).stem)
        assert r["origin"].startswith(prefix + "stage_2_train_labels.csv:")
        assert r["dicom"]["voi"] == "8bit" and r["dicom"]["decoder"] == "pillow"
        assert r["dicom"]["transfer_syntax"] == "JPEG Baseline (Process 1)"
    statuses = accounted(m)
    assert statuses[f"{prefix}stage_2_test_images/{layouts.rsna_id(10_000)}.dcm"] == "unlabelled"
    assert statuses[f"{prefix}stage_2_detailed_class_info.csv"] == "ignored"
    label_rows = {(r["line"], r["status"]) for r in m.data["label_rows"]}
    assert sum(1 for _, s in label_rows if s == "merged") == 8  # 8 positives, 2 boxes each
    (missing,) = [r for r in m.data["label_rows"] if r["status"] == "missing_file"]
    assert missing["path"].endswith(f"{layouts.rsna_id(16)}.dcm")
    assert source["label_summary"]["rows"] == {"labelled": 16, "merged": 8, "missing_file": 1}
    # No official split in RSNA: everything split by patient, 3 ways.
    assert set(m.splits) == {"train", "val", "test"} and source["split_mode"] == "all"
    assert_patient_disjoint(m)
    assert sum(source["views"][s].get("AP", 0) for s in source["views"]) == 4
    # The stored pixels are dicom.decode_dicom's.
    rec = records(m, "train", "pneumonia")[0]
    path = tmp_path / "src" / rec["source_path"].decode()
    expected_pixels, _ = dicom.decode_dicom(path.read_bytes(), PreprocessSpec(32))
    np.testing.assert_array_equal(rec["image"][..., 0], expected_pixels)


def test_rsna_views_filter_drops_rows_by_the_dicom_tag(tmp_path):
    src = tmp_path / "src"
    layouts.write_rsna(src, n=16)
    m = run(src, tmp_path / "out", views="PA", dataset_name="rsna-pa")
    assert m.data["source"]["dataset_name"] == "rsna-pa"
    assert {r["view"] for r in written(m).values()} == {"PA"}
    dropped = [r for r in m.data["files"] if r["status"] == "dropped"]
    assert len(dropped) == 4 and all(r["reason"] == "view AP not in allowed views PA"
                                     for r in dropped)
    assert set(accounted(m)) == on_disk(src)


# ---------------------------------------------------------------- nih

def test_nih_end_to_end_keeps_the_official_test_list(tmp_path):
    src = tmp_path / "src"
    expected = layouts.write_nih(src, patients=12, test_patients=(1, 2, 3))
    m = run(src, tmp_path / "out")
    assert m.data["source"]["preset"] == "nih" and m.data["source"]["split_mode"] == "official"
    assert set(accounted(m)) == on_disk(src)
    rows = written(m)
    assert {Path(p).name for p in rows} == set(expected)
    for path, r in rows.items():
        label, patient, view, _, official = expected[Path(path).name]
        assert (r["label"], r["patient_id"], r["view"], r["official_split"]) == (
            label, patient, view, official)
        assert (r["split"] == "test") == (official == "test")  # the list is the test split
        assert "dicom" not in r
    assert_patient_disjoint(m)
    assert {"test_list.txt", "train_val_list.txt", "Data_Entry_2017.csv"} <= {
        i["path"] for i in m.data["ignored"]}
    assert {i["path"] for i in m.data["source"]["inputs"]} == {
        "Data_Entry_2017.csv", "test_list.txt", "train_val_list.txt"}


def test_nih_no_finding_negatives_and_identical_bytes_grouped(tmp_path):
    src = tmp_path / "src"
    expected = layouts.write_nih(src, patients=12, test_patients=(1, 2))
    # Patient 7's first image copied under patient 8's first name (both pneumonia):
    # byte-identical files of two patients must share a split.
    a = src / "images_002" / "images" / "00000007_000.png"
    b = src / "images_002" / "images" / "00000008_000.png"
    b.write_bytes(a.read_bytes())
    m = run(src, tmp_path / "out", negatives="no_finding", seed=3)
    rows = {Path(r["path"]).name: r for r in m.data["files"]}
    for name, (_, _, _, finding, _) in expected.items():
        if finding in ("Effusion", "Atelectasis"):
            assert rows[name]["status"] == "dropped" and "neither positive" in rows[name]["reason"]
    copies = [rows["00000007_000.png"], rows["00000008_000.png"]]
    assert [r["status"] for r in copies] == ["written", "written"]
    assert copies[0]["split"] == copies[1]["split"]
    assert [["images_002/images/00000007_000.png", "images_002/images/00000008_000.png"]] == \
        m.data["duplicates"]["within_split"]
    assert m.data["source"]["label_options"]["negative_values"] == ["No Finding"]


def test_a_test_list_that_splits_a_patient_is_refused(tmp_path):
    src = tmp_path / "src"
    layouts.write_nih(src, patients=8, test_patients=(1,))
    lines = (src / "test_list.txt").read_text().split()
    (src / "test_list.txt").write_text("\n".join(lines + ["00000002_000.png"]) + "\n")
    train_val = (src / "train_val_list.txt").read_text().split()
    (src / "train_val_list.txt").write_text(
        "\n".join(n for n in train_val if n != "00000002_000.png") + "\n")
    with pytest.raises(LeakageError, match="patient id"):
        run(src, tmp_path / "out")


# ---------------------------------------------------------------- chexpert

def test_chexpert_end_to_end(tmp_path):
    src = tmp_path / "src"
    expected = layouts.write_chexpert(src, train_patients=12, valid_patients=4)
    m = run(src, tmp_path / "out")
    assert m.data["source"]["preset"] == "chexpert"
    assert set(accounted(m)) == on_disk(src)
    statuses = accounted(m)
    for path, (value, patient, view, table) in expected.items():
        status = statuses[path]
        if view == "LATERAL":
            assert status == "dropped", path  # frontal views only by default
        elif value == "-1.0":
            assert status == "dropped", path  # uncertain: U-Ignore
        else:
            assert status == "written", path
            r = written(m)[path]
            assert r["label"] == ("pneumonia" if value == "1.0" else "normal")  # blank: negative
            assert (r["patient_id"], r["view"]) == (patient, view)
            assert (r["split"] == "test") == (table == "valid")
    assert_patient_disjoint(m)


def test_chexpert_uncertain_ones_all_views_and_pooled_valid(tmp_path):
    src = tmp_path / "src"
    expected = layouts.write_chexpert(src, train_patients=12, valid_patients=4)
    m = run(src, tmp_path / "out", uncertain="ones", views="all", chexpert_valid="pool")
    rows = written(m)
    assert any(r["view"] == "LATERAL" for r in rows.values())
    for path, (value, *_rest) in expected.items():
        if value == "-1.0":
            assert rows[path]["label"] == "pneumonia"
    assert m.data["source"]["split_mode"] == "all"  # nothing official is left


# ---------------------------------------------------------------- kaggle stays the default

def test_kaggle_layout_is_detected_and_named_after_its_folder(synthetic_source, tmp_path):
    m = run(synthetic_source, tmp_path / "out", image_size=16)
    assert m.data["source"]["preset"] == "kaggle"
    assert m.data["source"]["dataset_name"] == synthetic_source.name
    assert m.data["label_rows"] == [] and "view" not in next(iter(written(m).values()))


def test_options_that_do_not_apply_are_clear_errors(synthetic_source, tmp_path):
    with pytest.raises(SourceOptionError, match="do not apply to the kaggle"):
        run(synthetic_source, tmp_path / "o", views="PA")
    layouts.write_nih(tmp_path / "nih", patients=4)
    with pytest.raises(UserError, match="uncertain do not apply to preset nih"):
        run(tmp_path / "nih", tmp_path / "o", uncertain="ones")
    with pytest.raises(SourceOptionError, match="--preset=csv needs --path_column"):
        run(tmp_path / "nih", tmp_path / "o", preset="csv", labels_csv="Data_Entry_2017.csv")


# ---------------------------------------------------------------- generic csv + DICOM, by CLI

def cli(*args):
    return run_module("pneumo_data.prepare", "--noprogress", *args, timeout=300)


@pytest.mark.slow
def test_csv_dicom_export_by_flags_records_every_outcome(tmp_path):
    from pydicom import uid
    from pydicom.encaps import encapsulate
    src = tmp_path / "export"
    expected = layouts.write_export(src, n=16)
    multi = make_dataset(np.zeros((2, 16, 16), np.uint16), bits_stored=12)
    write(src / "dicom" / "multi.dcm", multi)
    write(src / "dicom" / "report.dcm", structured_report())
    lossless = make_dataset(np.zeros((16, 16), np.uint16), bits_stored=12)
    lossless.PixelData = encapsulate([b"\xff\xd8 not decodable here \xff\xd9"])
    lossless["PixelData"].VR = "OB"
    lossless.file_meta.TransferSyntaxUID = uid.JPEGLosslessSV1
    write(src / "dicom" / "lossless.dcm", lossless)
    with open(src / "labels.csv", "a") as handle:
        handle.write("dicom/multi.dcm,Pneumonia\ndicom/report.dcm,No Finding\n"
                     "dicom/lossless.dcm,No Finding\ndicom/img000.dcm,No Finding\n"
                     "dicom/img001.dcm,No Finding\ndicom/gone.dcm,Pneumonia\n"
                     "dicom/img002.dcm,Uncertain\n")
    (src / "notes.txt").write_text("export notes")
    out = tmp_path / "out"
    args = [f"--source_dir={src}", f"--output_dir={out}", "--image_size=24",
            "--labels_csv=labels.csv", "--path_column=file", "--label_column=finding",
            "--positive_values=Pneumonia", "--negative_values=No Finding",
            "--drop_values=Uncertain", "--num_workers=2"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "label rows: 23 = " in proc.stdout and "1 missing_file" in proc.stdout
    m = manifest.load_manifest(out)
    assert m.data["source"]["preset"] == "csv" and m.data["source"]["dataset_name"] == "export"
    statuses = accounted(m)
    assert set(statuses) == on_disk(src)
    rows = {r["path"]: r for r in m.data["files"]}
    assert rows["dicom/multi.dcm"]["reason"].startswith("multi-frame DICOM: 2 frames")
    assert rows["dicom/report.dcm"]["reason"].startswith("no pixel data")
    assert rows["dicom/lossless.dcm"]["reason"].startswith(
        "DICOM transfer syntax without an installed decoder: JPEG Lossless")
    assert "pip install 'pneumo[dicom]'" in rows["dicom/lossless.dcm"]["reason"]
    assert rows["dicom/img001.dcm"]["status"] == "conflicting_labels"
    assert statuses["notes.txt"] == statuses["labels.csv"] == "ignored"
    by_status = {}
    for r in m.data["label_rows"]:
        by_status.setdefault(r["status"], []).append(r["line"])
    assert by_status == {"duplicate_row": [21], "conflicting_labels": [3, 22],
                         "missing_file": [23], "dropped": [24]}
    for path, (label, patient, view) in expected.items():
        if rows[path]["status"] == "written":
            r = rows[path]
            assert (r["label"], r["patient_id"], r["view"]) == (label, patient, view)
            assert r["dicom"]["voi"] == "window" and r["dicom"]["photometric"] == "MONOCHROME1"
    assert_patient_disjoint(m)
    # The same options from Python; the same images with a changed label table are another
    # source: no silent reuse.
    options = dict(image_size=24, labels_csv="labels.csv", path_column="file",
                   label_column="finding", positive_values="Pneumonia",
                   negative_values="No Finding", drop_values="Uncertain")
    assert run(src, out, **options).data["created"] == m.data["created"]  # up to date
    text = (src / "labels.csv").read_text().replace("dicom/img004.dcm,No Finding",
                                                    "dicom/img004.dcm,Pneumonia")
    (src / "labels.csv").write_text(text)
    with pytest.raises(PrepareError, match="other options or from other source files"):
        run(src, out, **options)
    # --views filters DICOM ViewPosition tags too.
    m = run(src, out, views="PA", overwrite=True, **options)
    assert {r["view"] for r in written(m).values()} == {"PA"}
    assert written(m)["dicom/img004.dcm"]["label"] == "pneumonia"
