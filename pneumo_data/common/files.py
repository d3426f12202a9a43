"""Outputs that appear complete or not at all: write beside under a partial name, then rename.

One naming convention for everything a job writes, so a partial output is recognisable by its
name and never mistaken for a finished one:

* a file ``report.png`` is written as ``report.partial.png`` (the extension stays last, since
  writers such as matplotlib and Keras choose the format by it);
* a folder ``export`` is written as ``export.partial``.

:func:`replacing` and :func:`replacing_dir` do the write-then-rename; :func:`write_text` and
:func:`write_json` are the common cases. These helpers know nothing about ownership: inside a
job, write through :class:`pneumo_data.common.outputs.OutputDir`, which also records what it
wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pneumo_data.common.errors import UserError

PARTIAL = "partial"


def partial_path(path: str | os.PathLike, is_dir: bool = False) -> Path:
    """The name ``path`` is written under until it is complete."""
    path = Path(path)
    if is_dir:
        return path.with_name(f"{path.name}.{PARTIAL}")
    return path.with_name(f"{path.stem}.{PARTIAL}{path.suffix}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike):
    """Yields a partial path beside ``path``; renames it onto ``path`` on success.

    On an exception the partial file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def replacing_dir(path: str | os.PathLike):
    """Yields an empty partial folder beside ``path``; swaps it in for ``path`` on success.

    The caller must have checked that an existing ``path`` may be replaced (it is removed
    whole). On an exception the partial folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = partial_path(path, is_dir=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    old = path.with_name(f"{path.name}.{PARTIAL}-old")
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    with replacing(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Writes ``data`` as indented JSON, atomically."""
    return write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parsed JSON of ``path``; a :class:`UserError` naming the file when it is unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a JSON file") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{what} {path} is not valid JSON ({error})") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text (JSON) file") from None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
