import json
import os

import pytest

from pneumo_data.common.outputs import (
    LEDGER_NAME,
    FolderBusyError,
    OutputDir,
    OutputError,
    final_name,
)
from tests.helpers import run_code


def test_first_use_needs_an_empty_folder_and_creates_nothing_when_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(OutputError, match=r"mine\.txt.*choose another folder"):
        OutputDir(tmp_path, "prepare").open()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    with OutputDir(tmp_path / "new" / "deep", "prepare") as out:
        out.write_text("a.txt", "x")
    assert json.loads((tmp_path / "new" / "deep" / LEDGER_NAME).read_text())["entries"] == {
        "a.txt": {"kind": "file"}}


def test_only_ledger_paths_are_replaced_or_deleted(tmp_path):
    with OutputDir(tmp_path, "train") as out:
        out.write_text("config.json", "{}")
    (tmp_path / "notes.txt").write_text("user notes")   # added later by the user
    with OutputDir(tmp_path, "train") as out:
        out.write_text("config.json", "{\"a\": 1}")    # its own file: rewritten
        with pytest.raises(OutputError, match="notes.txt exists and was not written"):
            out.write_text("notes.txt", "overwritten?")
        with pytest.raises(OutputError, match="not deleting"):
            out.remove("notes.txt")
        assert out.foreign() == ["notes.txt"]
        assert out.clear() == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "user notes"


def test_a_sealed_folder_keeps_files_someone_else_put_in_it(tmp_path):
    with OutputDir(tmp_path, "train") as out:
        with out.replacing_dir("export") as tmp:
            (tmp / "saved_model.pb").write_bytes(b"model")
    (tmp_path / "export" / "important.txt").write_text("keep me")
    with OutputDir(tmp_path, "train") as out:
        with pytest.raises(OutputError, match="important.txt"):
            with out.replacing_dir("export"):
                raise AssertionError("must not be reached")
        with pytest.raises(OutputError, match="not deleting anything"):
            out.clear()
    assert (tmp_path / "export" / "important.txt").read_text() == "keep me"
    assert (tmp_path / "export" / "saved_model.pb").exists()


def test_another_jobs_folder_is_refused(tmp_path):
    with OutputDir(tmp_path, "prepare") as out:
        out.write_text("manifest.json", "{}")
    with pytest.raises(OutputError, match="written by pneumo's prepare job, not train"):
        OutputDir(tmp_path, "train").open()


@pytest.mark.slow
def test_second_writer_is_told_the_pid_and_the_lock_goes_with_the_process(tmp_path):
    with OutputDir(tmp_path, "prepare"):
        code = ("from pneumo_data.common.outputs import OutputDir\n"
                f"OutputDir({str(tmp_path)!r}, 'prepare').open()\n")
        proc = run_code(code)
        assert proc.returncode == 1
        assert f"is being written by pid {os.getpid()} (prepare)" in proc.stderr
        with pytest.raises(FolderBusyError):
            OutputDir(tmp_path, "prepare").open()  # a second open in this process too
    # A holder killed without cleaning up releases the lock.
    code = ("import os, signal\nfrom pneumo_data.common.outputs import OutputDir\n"
            f"OutputDir({str(tmp_path)!r}, 'prepare').open()\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert run_code(code).returncode == -9
    with OutputDir(tmp_path, "prepare"):
        pass


def test_partial_names_belong_to_their_final_name(tmp_path):
    assert final_name("manifest.partial.json") == "manifest.json"
    assert final_name("export.partial") == "export"
    assert final_name("export.partial-old") == "export"
    assert final_name("train-normal-00000-of-00001.partial.tfrecord") == (
        "train-normal-00000-of-00001.tfrecord")
    with OutputDir(tmp_path, "prepare") as out:
        out.claim("manifest.json")
        assert out.owns("manifest.partial.json") and not out.owns("other.partial.json")
        out.subdir("logs")
        assert out.owns("logs/train/events.1")


def test_a_nested_jobs_folder_is_cleared_through_its_own_ledger(tmp_path):
    with OutputDir(tmp_path, "train") as out:
        data = out.nested("data", job="prepare")
        with OutputDir(data, "prepare") as inner:
            inner.write_text("manifest.json", "{}")
        out.write_text("run.json", "{}")
    (tmp_path / "data" / "mine.txt").write_text("keep")
    with OutputDir(tmp_path, "train") as out:
        assert sorted(out.clear()) == ["data", "run.json"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()
                  if not p.name.startswith(".")) == ["mine.txt"]
    (tmp_path / "data" / "mine.txt").unlink()
    with OutputDir(tmp_path, "train") as out:
        out.nested("data", job="prepare")
        with OutputDir(tmp_path / "data", "prepare") as inner:
            inner.write_text("manifest.json", "{}")
        out.clear()
    assert not (tmp_path / "data").exists()
