"""Small DICOM files written with pydicom, for the DICOM and preset tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate


def make_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2",
                 bits_stored: int | None = None,
                 sop_class=uid.DigitalXRayImageStorageForPresentation, **tags) -> Dataset:
    """A single-image dataset with the tags ingest reads; ``tags`` override or add any."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = sop_class
    ds.PatientID = "PAT-1"
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(path: Path, ds: Dataset) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_bytes(ds))
    return path


def gradient(shape=(48, 64), low=0, high=4095, dtype=np.uint16, seed=0) -> np.ndarray:
    """A smooth ramp plus noise covering ``low..high``: every grey level path gets exercised."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(low, high, shape[0] * shape[1]).reshape(shape)
    noisy = ramp + rng.normal(0, (high - low) * 0.02, shape)
    return np.clip(np.rint(noisy), low, high).astype(dtype)


def jpeg_baseline_dataset(gray: np.ndarray, quality: int = 90, **tags) -> Dataset:
    """An 8-bit MONOCHROME2 secondary capture in JPEG Baseline, like the RSNA challenge files."""
    buffer = io.BytesIO()
    Image.fromarray(gray, "L").save(buffer, "JPEG", quality=quality)
    ds = make_dataset(gray, sop_class=uid.SecondaryCaptureImageStorage, Modality="CR", **tags)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return ds


def structured_report() -> Dataset:
    """A Basic Text SR: a valid DICOM file with no pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = uid.BasicTextSRStorage
    ds.SOPInstanceUID = uid.generate_uid()
    ds.PatientID = "PAT-SR"
    ds.Modality = "SR"
    return ds
