"""DICOM ingest helpers for ``benchmarks.prepare --dicom``: generated 16-bit DICOM folders and
per-file decode rates.

The files are X-ray-like 16-bit fields (low-frequency structure and noise over most of the
range), 2048x2048 by default: the size and depth of a digital radiograph.
"""

from __future__ import annotations

import concurrent.futures
import io
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pneumo_data.preprocess import PreprocessSpec, decode, dicom
from pneumo_data.preprocess.stored import resize_stored

SIDE = 2048
KINDS = ("dicom 16-bit window", "dicom 12-bit MONOCHROME1 min/max", "dicom RLE 16-bit window",
         "png 16-bit (reference)")


def field(seed: int, side: int = SIDE) -> np.ndarray:
    """A smooth X-ray-like 16-bit field (low-frequency structure + noise), values 0..65535."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 1, (max(2, side // 64), max(2, side // 64)))
    smooth = np.asarray(Image.fromarray(coarse.astype(np.float32), "F").resize(
        (side, side), Image.Resampling.BICUBIC))
    smooth = (smooth - smooth.min()) / (np.ptp(smooth) or 1)
    noisy = smooth * 50000 + 5000 + rng.normal(0, 400, (side, side))
    return np.clip(noisy, 0, 65535).astype(np.uint16)


def _dataset(pixels, photometric, bits, **tags):
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = uid.DigitalXRayImageStorageForPresentation
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.set_pixel_data(pixels, photometric, bits)
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


_WINDOW = dict(WindowCenter="30000", WindowWidth="50000", RescaleSlope="1",
               RescaleIntercept="0")


def write_source(folder: Path, count: int, side: int = SIDE) -> Path:
    """A CSV-labelled folder of ``count`` 16-bit windowed DICOMs (half pneumonia), one patient
    per two files, for an end-to-end prepare (``--preset=csv``); returns the folder."""
    rows = ["file,label"]
    (folder / "dicom").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        ds = _dataset(field(i, side), "MONOCHROME2", 16, PatientID=f"B{i // 2}", **_WINDOW)
        ds.save_as(folder / "dicom" / f"{i:04d}.dcm", enforce_file_format=True)
        rows.append(f"dicom/{i:04d}.dcm,{i % 2}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def write_kinds(folder: Path, count: int, side: int = SIDE) -> dict[str, list[Path]]:
    """``count`` files of each kind in :data:`KINDS`; returns kind -> paths."""
    from PIL import Image
    from pydicom import uid
    kinds: dict[str, list[Path]] = {k: [] for k in KINDS}
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = field(i, side)
        ds = _dataset(pixels, "MONOCHROME2", 16, PatientID="BENCH", **_WINDOW)
        for kind, name, data in ((KINDS[0], f"w{i}.dcm", ds),
                                 (KINDS[1], f"m{i}.dcm",
                                  _dataset(pixels >> 4, "MONOCHROME1", 12, PatientID="BENCH"))):
            data.save_as(folder / name, enforce_file_format=True)
            kinds[kind].append(folder / name)
        ds.compress(uid.RLELossless)
        ds.save_as(folder / f"r{i}.dcm", enforce_file_format=True)
        kinds[KINDS[2]].append(folder / f"r{i}.dcm")
        Image.fromarray(pixels).save(folder / f"p{i}.png")  # I;16 PNG
        kinds[KINDS[3]].append(folder / f"p{i}.png")
    return kinds


def _rate(work: Callable[[Path], Any], paths: list[Path], threads: int,
          repeats: int) -> dict[str, float]:
    def once() -> float:
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(work, paths):
                pass
        return len(paths) / (time.perf_counter() - start)
    once()  # warm-up: page cache, imports, thread start
    rates = [once() for _ in range(repeats)]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def decode_rates(folder: Path, images: int, image_size: int, threads: tuple[int, ...],
                 repeats: int, side: int = SIDE) -> dict[str, dict[str, dict[str, float]]]:
    """Images/s per file kind and thread count of the writer's decode call
    (:func:`pneumo_data.preprocess.decode`: read, parse, decode, grey levels, resize), and of
    the header-only read the planner does per DICOM file without a patient or view column."""
    kinds = write_kinds(folder, images, side)
    spec = PreprocessSpec(stored_size=image_size)

    def decode_work(path):
        return decode(path.read_bytes(), spec).pixels

    results = {kind: {f"threads={t}": _rate(decode_work, paths, t, repeats) for t in threads}
               for kind, paths in kinds.items()}
    results["header only (planning)"] = {
        f"threads={t}": _rate(dicom.read_dicom_info, kinds[KINDS[0]], t, repeats)
        for t in threads}
    return results


def stage_ms(path: Path, image_size: int, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per stage for one DICOM file, one thread (median of ``repeats``)."""
    import pydicom

    spec = PreprocessSpec(stored_size=image_size)
    stages: dict[str, list[float]] = {}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        stages.setdefault(name, []).append((time.perf_counter() - start) * 1000)
        return value

    for _ in range(repeats):
        data = timed("read bytes", path.read_bytes)
        ds = timed("pydicom parse", lambda d=data: pydicom.dcmread(io.BytesIO(d)))
        pixels = timed("pixel_array", lambda d=ds: d.pixel_array)
        gray = timed("modality+VOI to uint8",
                     lambda p=pixels, d=ds: dicom._monochrome_to_uint8(p, d)[0])
        timed("resize", lambda g=gray: resize_stored(g, spec))
    return {k: statistics.median(v) for k, v in stages.items()}
