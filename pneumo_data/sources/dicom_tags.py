"""DICOM metadata for sources: patient id and view position from the header, pixels unread.

CSV-labelled sources often leave the patient or the view to the image itself (RSNA's table has
no view column; a hospital export may have no patient column). :func:`read_tags` reads the
header of a DICOM file (pydicom with ``defer_size``: the pixel data is skipped, not read; about
1,500 files/s) so the planner can fill them in before anything is decoded. Files that are not
DICOM, or whose header is unreadable, give ``None``: the writer records the decode failure
later, with its reason.
"""

from __future__ import annotations

from pathlib import Path

from pneumo_data.preprocess.dicom import DicomDecodeError, read_dicom_info

DICOM_SUFFIXES = (".dcm", ".dicom", "")  # "": DICOM exports often have no suffix


def may_be_dicom(relpath: str) -> bool:
    return Path(relpath).suffix.lower() in DICOM_SUFFIXES


def read_tags(path: Path):
    """The file's :class:`pneumo_data.preprocess.dicom.DicomInfo` (header only), or
    ``None``."""
    try:
        return read_dicom_info(path)
    except (DicomDecodeError, OSError):
        return None
