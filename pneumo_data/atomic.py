"""Outputs that appear complete or not at all: write beside, then rename.

Every job writes its results through these helpers, so a killed run never
leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike):
    """Yields a temporary path beside ``path``; renames it onto ``path`` on success.

    The temporary name keeps the extension (``report.partial.png``), since
    writers such as matplotlib and Keras choose the format by it. On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    with replacing(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)
