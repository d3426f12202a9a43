"""One writer per output folder, and a ledger of what it wrote there.

Every pneumo job that writes a folder (prepare's data_dir, train's model_dir, evaluate's
report folder) opens it as an :class:`OutputDir`:

* **A lock.** ``DIR/.pneumo.lock`` is locked exclusively (``fcntl.flock``) for as long as the
  job runs. A second job on the same folder stops at once with "DIR is being written by pid
  N". The kernel releases the lock when the process ends, however it ends (crash, SIGKILL);
  the lock file itself stays (deleting it would let two writers hold locks on two inodes).
* **A ledger.** ``DIR/.pneumo-ledger.json`` lists every path the job created, written
  *before* the path is created (write-ahead), so after a crash the ledger still names every
  partial file. A job deletes or rewrites only paths its ledger lists; a folder it writes is
  sealed with the list of its files, and a file someone else put into it later is never
  deleted. ``--overwrite`` therefore means "replace pneumo's own outputs", never "delete
  what is there".
* **First use.** A folder without a ledger must be empty (or not exist): pneumo never starts
  writing into a folder that already holds someone else's files.

Example::

    with OutputDir("runs/cnn", job="train") as out:
        out.write_json("config.json", config)
        with out.replacing("model.keras") as tmp:
            model.save(tmp)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from pneumo_data.common import files
from pneumo_data.common.errors import UserError

LEDGER_NAME = ".pneumo-ledger.json"
LOCK_NAME = ".pneumo.lock"
RESERVED = frozenset({LEDGER_NAME, LOCK_NAME, files.partial_path(LEDGER_NAME).name})
LEDGER_FORMAT = "pneumo-ledger"
LEDGER_VERSION = 1
_PARTIAL_RE = re.compile(r"\.partial(?:-old)?(?=\.|$)")


class OutputError(UserError):
    """An output folder pneumo may not write into, or a path it may not replace."""


class FolderBusyError(OutputError):
    """Another process holds the folder's lock."""


def final_name(name: str) -> str:
    """The finished name of a partial name (``a.partial.json`` -> ``a.json``)."""
    return _PARTIAL_RE.sub("", name, count=1)


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in RESERVED)


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() or p.is_symlink())


def _shown(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def lock_folder(path: Path, job: str) -> int:
    """Creates ``path`` if needed and locks ``path/.pneumo.lock`` exclusively for this
    process (released when the descriptor is closed or the process ends, however it ends);
    :class:`FolderBusyError` when another process holds it. Returns the lock's descriptor."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError as error:
        raise OutputError(f"cannot write to {path}: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise FolderBusyError(
                f"{path} is being written by pid {holder}; wait for that job to "
                f"finish, or choose another folder") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} ({job})\n".encode(), 0)
    return fd


class OutputDir:
    """An output folder written by one pneumo job (see the module docstring).

    Args:
      path: the folder (created if missing).
      job: the job's name; a folder written by another job is refused.
    """

    def __init__(self, path: str | os.PathLike, job: str):
        self.path = Path(path)
        self.job = job
        self._fd: int | None = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._created = False

    # ------------------------------------------------------------------ open / close

    def __enter__(self) -> "OutputDir":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path} exists and is not a folder")
        self._refuse_foreign()  # before anything (even the lock file) is created
        self._created = not self.path.exists()
        self._fd = lock_folder(self.path, self.job)
        try:
            self._load_ledger()
            self._refuse_foreign()  # again: another writer may have finished meanwhile
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the lock. A folder this job created and wrote nothing into (a check
        failed after it was opened) is removed again, so no empty output is left behind."""
        if self._fd is None:
            return
        if self._created and not self._entries:
            with contextlib.suppress(OSError):
                self.ledger_path.unlink(missing_ok=True)
                (self.path / LOCK_NAME).unlink()
                self.path.rmdir()  # only if empty: anything else written there stays
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    @property
    def ledger_path(self) -> Path:
        return self.path / LEDGER_NAME

    def _refuse_foreign(self) -> None:
        if not self.path.is_dir() or self.ledger_path.exists():
            return
        foreign = _visible(self.path)
        if foreign:
            raise OutputError(
                f"{self.path} already holds {len(foreign)} file(s) or folder(s) that pneumo did "
                f"not write ({_shown(foreign)}). The {self.job} job writes only into an empty "
                f"folder or one it wrote itself, and never deletes other files; choose another "
                f"folder")

    def _load_ledger(self) -> None:
        if not self.ledger_path.exists():
            self._entries = {}
            return
        data = files.read_json(self.ledger_path, "pneumo ledger")
        if not (isinstance(data, dict) and data.get("format") == LEDGER_FORMAT
                and isinstance(data.get("entries"), dict)):
            raise OutputError(f"{self.ledger_path} is not a pneumo ledger; not touching "
                              f"{self.path}")
        if data.get("job") != self.job:
            raise OutputError(
                f"{self.path} was written by pneumo's {data.get('job')} job, not {self.job}; "
                f"choose another folder")
        self._entries = data["entries"]

    def _save_ledger(self) -> None:
        files.write_json(self.ledger_path, {"format": LEDGER_FORMAT, "version": LEDGER_VERSION,
                                            "job": self.job, "entries": self._entries})

    def _require_open(self) -> None:
        if self._fd is None:
            raise RuntimeError(f"OutputDir {self.path} is not open (use it as a context manager)")

    # ------------------------------------------------------------------ ownership

    @staticmethod
    def _rel(rel: str | os.PathLike) -> str:
        rel = Path(rel)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"output paths are relative to the folder, got {rel}")
        return rel.as_posix()

    def owns(self, rel: str | os.PathLike) -> bool:
        """True when ``rel`` (or its partial name, or a folder holding it) is in the ledger."""
        parts = Path(self._rel(rel)).parts
        for i in range(1, len(parts) + 1):
            head = "/".join(parts[:i - 1] + (final_name(parts[i - 1]),))
            entry = self._entries.get(head)
            if entry is not None and (i == len(parts) or entry["kind"] == "dir"):
                return True
        return False

    def owned(self) -> list[str]:
        return sorted(self._entries)

    def foreign(self) -> list[str]:
        """Top-level names in the folder that this job's ledger does not list."""
        return [n for n in _visible(self.path) if not self.owns(n)]

    def claim(self, rel: str | os.PathLike, kind: str = "file") -> Path:
        """Records ``rel`` as this job's (before it is created); returns its full path.

        Raises OutputError when the path exists and the ledger does not list it.
        """
        self._require_open()
        rel = self._rel(rel)
        if kind not in ("file", "dir"):
            raise ValueError(f"kind must be file or dir, got {kind!r}")
        target = self.path / rel
        if not self.owns(rel):
            for existing in (target, files.partial_path(target, kind == "dir")):
                if existing.exists() or existing.is_symlink():
                    raise OutputError(
                        f"{existing} exists and was not written by pneumo's {self.job} job; "
                        f"not replacing it. Move it away or choose another folder")
            self._entries[rel] = {"kind": kind}
            self._save_ledger()
        return target

    def seal(self, rel: str | os.PathLike) -> None:
        """Records the files now inside folder ``rel``; only those may be deleted later."""
        self._require_open()
        rel = self._rel(rel)
        entry = self._entries.get(rel)
        if entry is None or entry["kind"] != "dir":
            raise ValueError(f"{rel} is not a folder in the ledger of {self.path}")
        entry["files"] = _listing(self.path / rel)
        self._save_ledger()

    def _foreign_inside(self, rel: str) -> list[str]:
        entry = self._entries.get(rel, {})
        folder = self.path / rel
        if entry.get("kind") != "dir" or "files" not in entry or not folder.is_dir():
            return []
        sealed = set(entry["files"])
        return [f for f in _listing(folder) if f not in sealed]

    def _refuse_foreign_inside(self, rel: str, refusal: str) -> None:
        """Raises OutputError (saying ``refusal``) when folder ``rel`` holds files that pneumo
        did not write."""
        foreign = self._foreign_inside(rel)
        if foreign:
            raise OutputError(f"{self.path / rel} holds files pneumo did not write "
                              f"({_shown(foreign)}); {refusal}. Move them away first")

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def replacing(self, rel: str | os.PathLike) -> Iterator[Path]:
        """Claims ``rel`` and yields its partial path; renamed onto ``rel`` on success."""
        target = self.claim(rel)
        with files.replacing(target) as tmp:
            yield tmp

    def write_text(self, rel: str | os.PathLike, text: str) -> Path:
        return files.write_text(self.claim(rel), text)

    def write_json(self, rel: str | os.PathLike, data: Any) -> Path:
        return files.write_json(self.claim(rel), data)

    def check_replaceable(self, rel: str | os.PathLike) -> None:
        """Raises OutputError unless :meth:`replacing_dir` may replace folder ``rel`` (for jobs
        that write several folders and check them all before writing any)."""
        self._require_open()
        rel = self._rel(rel)
        target = self.path / rel
        if not self.owns(rel) and (target.exists() or target.is_symlink()):
            raise OutputError(f"{target} exists and was not written by pneumo's {self.job} job; "
                              f"not replacing it. Move it away or choose another folder")
        self._refuse_foreign_inside(rel, "not replacing it")

    @contextlib.contextmanager
    def replacing_dir(self, rel: str | os.PathLike) -> Iterator[Path]:
        """Claims folder ``rel``, yields an empty partial folder, swaps it in and seals it.

        Raises OutputError before anything is written when the existing folder holds files
        pneumo did not write.
        """
        rel = self._rel(rel)
        self.check_replaceable(rel)
        target = self.claim(rel, "dir")
        with files.replacing_dir(target) as tmp:
            yield tmp
        self.seal(rel)

    def subdir(self, rel: str | os.PathLike) -> Path:
        """Claims folder ``rel`` (created) for a writer that manages it itself."""
        target = self.claim(rel, "dir")
        target.mkdir(parents=True, exist_ok=True)
        return target

    def nested(self, rel: str | os.PathLike, job: str) -> Path:
        """Claims folder ``rel`` as the output folder of another job, which keeps its own
        ledger there (train's ``data/``, written by prepare). Removing it removes only
        what that job's ledger lists."""
        self._require_open()
        rel = self._rel(rel)
        target = self.claim(rel, "dir")
        if self._entries[rel].get("job") != job:
            self._entries[rel]["job"] = job
            self._save_ledger()
        return target

    # ------------------------------------------------------------------ deleting

    def remove(self, rel: str | os.PathLike, missing_ok: bool = True) -> None:
        """Deletes ``rel`` (and its partial name) if, and only if, this job wrote it.

        A sealed folder holding files that pneumo did not write is refused whole.
        """
        self._require_open()
        rel = self._rel(rel)
        if not self.owns(rel):
            raise OutputError(f"{self.path / rel} was not written by pneumo's {self.job} job; "
                              f"not deleting it")
        self._refuse_foreign_inside(rel, "not deleting it")
        entry = self._entries.get(rel, {"kind": "file"})
        if "job" in entry:
            self._remove_nested(rel, entry["job"])
            return
        is_dir = entry["kind"] == "dir"
        for path in (self.path / rel, files.partial_path(self.path / rel, is_dir)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            elif not missing_ok and path == self.path / rel:
                raise FileNotFoundError(path)
        if rel in self._entries:
            del self._entries[rel]
            self._save_ledger()

    def _remove_nested(self, rel: str, job: str) -> None:
        folder = self.path / rel
        if folder.is_dir():
            with OutputDir(folder, job) as inner:
                inner.clear()
            if not set(os.listdir(folder)) <= RESERVED:
                return  # someone else's files are left: the folder (and the claim) stay
            for name in os.listdir(folder):
                (folder / name).unlink()
            folder.rmdir()
        del self._entries[rel]
        self._save_ledger()

    def clear(self, keep: tuple[str, ...] = ()) -> list[str]:
        """Deletes everything this job wrote here (but ``keep``); returns what was removed.

        Checks every entry first, so a refusal deletes nothing.
        """
        self._require_open()
        doomed = [rel for rel in self.owned() if rel not in keep]
        for rel in doomed:
            self._refuse_foreign_inside(rel, "not deleting anything")
        for rel in doomed:
            self.remove(rel)
        return doomed


class OwnedFile:
    """One output file in a folder pneumo does not own (``predict --output=labels.csv``).

    A folder's ledger cannot vouch for a single file among a user's own, so the file gets a
    hidden stamp beside it, ``.NAME.pneumo.json``, recording the job and the sha256 of what it
    wrote. An existing file is replaced only when its stamp is there and its bytes are still
    the ones stamped: a file pneumo did not write, or one edited since (a radiologist's
    corrections in a predictions CSV), is refused before any work. The stamp is written before
    the file is renamed into place and lists both the old and the new content while they
    swap, so a kill at any point leaves a file the next run recognises.

    Example::

        owned = OwnedFile("predictions.csv", job="predict")
        owned.check()                      # before any work
        with owned.replacing() as tmp:
            write(tmp)
    """

    def __init__(self, path: str | os.PathLike, job: str):
        self.path = Path(path)
        self.job = job
        self.stamp = self.path.with_name(f".{self.path.name}.pneumo.json")

    def _stamped(self) -> list[str]:
        if not self.stamp.is_file():
            return []
        try:
            data = files.read_json(self.stamp, "pneumo stamp")
        except UserError:
            return []
        if not (isinstance(data, dict) and data.get("job") == self.job):
            return []
        return [str(s) for s in data.get("sha256", [])]

    def check(self) -> None:
        """Raises OutputError unless the path is free or holds this job's unedited output."""
        if self.path.is_dir():
            raise OutputError(f"{self.path} is a folder; give a file path")
        if not (self.path.exists() or self.path.is_symlink()):
            return
        if files.file_sha256(self.path) not in self._stamped():
            raise OutputError(
                f"{self.path} exists and is not an unedited output of pneumo's {self.job} job "
                f"(it has no stamp {self.stamp.name} beside it, or was changed since); not "
                f"replacing it. Choose another path, or move the file away")

    @contextlib.contextmanager
    def replacing(self) -> Iterator[Path]:
        """Yields a partial path; on success it replaces the file, stamped as this job's."""
        self.check()
        old = self._stamped() if self.path.exists() else []
        with files.replacing(self.path) as tmp:
            yield tmp
            new = files.file_sha256(tmp)
            files.write_json(self.stamp, {"job": self.job, "sha256": sorted({*old, new})})
        files.write_json(self.stamp, {"job": self.job, "sha256": [new]})
