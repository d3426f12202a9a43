"""Tiny look-alikes of the public collections' layouts, written by the tests themselves.

File names, CSV columns and DICOM tags follow the real downloads (see the docstring of
:mod:`pneumo_data.sources.presets` for the sources); the pixels are generated chest-X-ray-like
images (:func:`pneumo_data.synthetic.render`), so a model trained on one dataset has something
to recognise in another. Each writer returns what the tests need to check per-row outcomes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pneumo_data.synthetic import render
from tests.dicom_files import jpeg_baseline_dataset, make_dataset, write


def write_text(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def xray(seed: int, pneumonia: bool, size: tuple[int, int] = (72, 64)) -> np.ndarray:
    """A generated [height, width] uint8 radiograph."""
    rng = np.random.default_rng(seed)
    return render(rng, ("bacterial" if seed % 2 else "viral") if pneumonia else "none", *size)


def png_bytes(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray, "L").save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- RSNA

def rsna_id(i: int) -> str:
    return f"{i:08x}-14fd-4e49-80ba-{i * 7919:012x}"


def write_rsna(root: Path, n: int = 16) -> dict:
    """``stage_2_train_labels.csv`` (one row per box) + 8-bit JPEG-baseline DICOMs.

    Image i is pneumonia when i is odd (two box rows), view AP when i % 4 == 1 else PA.
    Adds one unlabelled test image, one row whose file is missing and the class-info CSV.
    """
    rows, expected = ["patientId,x,y,width,height,Target"], {}
    for i in range(n):
        pid, positive = rsna_id(i), i % 2 == 1
        view = "AP" if i % 4 == 1 else "PA"
        if positive:
            rows += [f"{pid},264.0,152.0,213.0,379.0,1", f"{pid},562.0,152.0,256.0,453.0,1"]
        else:
            rows.append(f"{pid},,,,,0")
        write(root / "stage_2_train_images" / f"{pid}.dcm",
              jpeg_baseline_dataset(xray(i, positive, (64, 64)), PatientID=pid,
                                    PatientName=pid, ViewPosition=view,
                                    BodyPartExamined="CHEST", SeriesDescription=f"view: {view}"))
        expected[pid] = ("pneumonia" if positive else "normal", view)
    rows.append(f"{rsna_id(n)},,,,,0")  # its image is not there: missing_file
    write_text(root / "stage_2_train_labels.csv", rows)
    write_text(root / "stage_2_detailed_class_info.csv",
               ["patientId,class", f"{rsna_id(0)},Normal"])
    write(root / "stage_2_test_images" / f"{rsna_id(10_000)}.dcm",
          jpeg_baseline_dataset(xray(99, False, (64, 64)), PatientID=rsna_id(10_000)))
    return expected


# ---------------------------------------------------------------- NIH

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_FINDINGS = ("Pneumonia", "No Finding", "Cardiomegaly|Pneumonia", "Effusion", "No Finding",
                "Atelectasis")


def write_nih(root: Path, patients: int = 12, per_patient: int = 2,
              test_patients: tuple[int, ...] = (1, 2, 3)) -> dict:
    """``Data_Entry_2017.csv``, PNGs in ``images_00N/images/``, ``train_val_list.txt`` and
    ``test_list.txt`` (patients ``test_patients`` are the official test split)."""
    rows, expected, train_val, test = [NIH_HEADER], {}, [], []
    k = 0
    for p in range(1, patients + 1):
        for f in range(per_patient):
            name = f"{p:08d}_{f:03d}.png"
            finding = NIH_FINDINGS[k % len(NIH_FINDINGS)]
            view = "AP" if k % 3 == 2 else "PA"
            rows.append(f"{name},{finding},{f},{p},58,M,{view},2682,2749,0.143,0.143,")
            folder = root / f"images_{1 + (p - 1) // 6:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(png_bytes(xray(k, "Pneumonia" in finding)))
            (test if p in test_patients else train_val).append(name)
            expected[name] = ("pneumonia" if "Pneumonia" in finding else "normal", str(p), view,
                              finding, "test" if p in test_patients else "train")
            k += 1
    write_text(root / "Data_Entry_2017.csv", rows)
    write_text(root / "train_val_list.txt", train_val)
    write_text(root / "test_list.txt", test)
    return expected


# ---------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,"
                   "Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,"
                   "Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
                   "Support Devices")
CHEXPERT_VALUES = ("1.0", "0.0", "-1.0", "", "1.0", "0.0")


def chexpert_row(path: str, frontal: str, ap_pa: str, pneumonia: str) -> str:
    cells = [path, "Female", "68", frontal, ap_pa] + [""] * 14
    cells[5 + 7] = pneumonia  # the Pneumonia column
    return ",".join(cells)


def write_chexpert(root: Path, train_patients: int = 12, valid_patients: int = 4) -> dict:
    """``CheXpert-v1.0-small/{train,valid}.csv`` and JPEGs under
    ``train|valid/patientNNNNN/studyN/viewN_frontal|lateral.jpg``: per patient one frontal view
    (Pneumonia cycling through 1, 0, -1, blank) and one lateral."""
    base = root / "CheXpert-v1.0-small"
    expected = {}
    for table, first, count in (("train", 1, train_patients), ("valid", 64541, valid_patients)):
        rows = [CHEXPERT_HEADER]
        for j in range(count):
            patient = f"patient{first + j:05d}"
            value = CHEXPERT_VALUES[j % len(CHEXPERT_VALUES)] if table == "train" else \
                ("1.0" if j % 2 else "0.0")
            for view, frontal, ap_pa in (("view1_frontal", "Frontal", "AP" if j % 2 else "PA"),
                                         ("view2_lateral", "Lateral", "")):
                rel = f"{table}/{patient}/study1/{view}.jpg"
                rows.append(chexpert_row(f"CheXpert-v1.0-small/{rel}", frontal, ap_pa, value))
                path = base / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(xray(first + j, value == "1.0")).save(path, "JPEG", quality=90)
                expected[f"CheXpert-v1.0-small/{rel}"] = (value, patient, ap_pa or "LATERAL",
                                                          table)
        write_text(base / f"{table}.csv", rows)
    return expected


# ---------------------------------------------------------------- a hospital export (csv)

def write_export(root: Path, n: int = 16, size: tuple[int, int] = (80, 64)) -> dict:
    """16-bit MONOCHROME1 DICOMs with a window, patient and view only in the tags, and a CSV
    ``labels.csv`` with ``file,finding`` (``No Finding`` / ``Pneumonia`` / ``Uncertain``)."""
    rows, expected = ["file,finding"], {}
    for i in range(n):
        positive = i % 2 == 1
        gray = xray(1000 + i, positive, size[::-1])
        # 12-bit stored values, MONOCHROME1 (inverted), with a window covering the range
        stored = (4095 - gray.astype(np.uint16) * 16).astype(np.uint16)
        ds = make_dataset(stored, "MONOCHROME1", bits_stored=12, PatientID=f"P{i // 2:03d}",
                          ViewPosition="AP" if i % 3 == 0 else "PA", WindowCenter="2048",
                          WindowWidth="4096")
        write(root / "dicom" / f"img{i:03d}.dcm", ds)
        rows.append(f"dicom/img{i:03d}.dcm,{'Pneumonia' if positive else 'No Finding'}")
        expected[f"dicom/img{i:03d}.dcm"] = ("pneumonia" if positive else "normal",
                                             f"P{i // 2:03d}", "AP" if i % 3 == 0 else "PA")
    write_text(root / "labels.csv", rows)
    return expected
