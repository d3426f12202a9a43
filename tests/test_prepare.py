import fcntl
import hashlib
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pneumo_data import manifest, records_tf
from pneumo_data.prepare import PrepareConfig, PrepareError, prepare
from pneumo_data.split import LeakageError
from pneumo_data.tfds.metadata import METADATA_FILES
from tests.helpers import (
    job_env,
    make_kaggle_tree,
    run_code,
    run_module,
    start_module,
    write_image,
)


def run(src, out, **kw):
    kw.setdefault("image_size", 32)
    kw.setdefault("progress", False)
    return prepare(PrepareConfig(source_dir=str(src), output_dir=str(out), **kw))


def records(data_dir, split, label):
    m = manifest.load_manifest(data_dir)
    rows = []
    for path in m.shard_paths(split, label):
        for raw in tf.data.TFRecordDataset(path):
            rows.append({k: v.numpy() for k, v in
                         records_tf.parse(raw, m.encoding, m.image_size).items()})
    return rows


def kaggle_source(tmp_path):
    names_n = [f"IM-{p:04d}-000{k}.jpeg" for p in range(1, 21) for k in (1, 2)]
    names_p = [f"person{p}_{'virus' if p % 3 else 'bacteria'}_{p * 10 + k}.jpeg"
               for p in range(1, 41) for k in (1, 2)]
    return make_kaggle_tree(tmp_path / "src", {
        "train": {"NORMAL": names_n[:30], "PNEUMONIA": names_p[:60]},
        "val": {"NORMAL": names_n[30:32], "PNEUMONIA": names_p[60:62]},
        "test": {"NORMAL": names_n[32:], "PNEUMONIA": names_p[62:]},
    })


def test_every_file_accounted_and_splits_patient_disjoint(tmp_path):
    src = kaggle_source(tmp_path)
    whole = (src / "train" / "NORMAL" / "IM-0001-0001.jpeg").read_bytes()
    (src / "train" / "NORMAL" / "broken.jpeg").write_bytes(whole[: len(whole) // 2])
    (src / "train" / "NORMAL" / "empty.png").write_bytes(b"")
    (src / "train" / "PNEUMONIA" / "notes.txt").write_text("not an image")
    m = run(src, tmp_path / "out")
    rows = {r["path"]: r for r in m.data["files"]}
    on_disk = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert set(rows) == on_disk
    assert rows["train/NORMAL/empty.png"]["reason"].startswith("empty file")
    assert rows["train/PNEUMONIA/notes.txt"]["reason"].startswith("not an image")
    assert rows["train/NORMAL/broken.jpeg"]["status"] == "skipped"
    written = [r for r in rows.values() if r["status"] == "written"]
    assert len(written) == len(on_disk) - 3
    # Official test untouched; train+val re-split.
    assert all(r["split"] == "test" for r in written if r["official_split"] == "test")
    assert {r["split"] for r in written if r["official_split"] != "test"} == {"train", "val"}
    split_of = {}
    for r in written:
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
    for split_name, by_class in m.data["counts"].items():
        for label, n in by_class.items():
            got = records(m.data_dir, split_name, label)
            assert len(got) == n == sum(e["records"] for e in m.shard_entries(split_name, label))
            assert {g["label"] for g in got} <= {0 if label == "normal" else 1}
    assert m.data["skipped"] == {"empty file (0 bytes)": 1, "not an image (unrecognised format)": 1,
                                 "corrupt or truncated image": 1}


def test_records_carry_metadata_and_pixels(tmp_path):
    src = tmp_path / "src"
    write_image(src / "NORMAL" / "IM-0001-0001.png", value=10, size=(32, 32))
    write_image(src / "PNEUMONIA" / "person1_virus_1.png", value=240, size=(32, 32))
    m = run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    (rec,) = records(m.data_dir, "train", "pneumonia")
    assert rec["patient_id"] == b"person1_virus" and rec["subtype"] == b"viral"
    assert rec["source_path"] == b"PNEUMONIA/person1_virus_1.png"
    source_bytes = (src / "PNEUMONIA" / "person1_virus_1.png").read_bytes()
    assert rec["source_sha256"].decode() == hashlib.sha256(source_bytes).hexdigest()
    from PIL import Image
    expected = np.asarray(Image.open(src / "PNEUMONIA" / "person1_virus_1.png"))
    np.testing.assert_array_equal(rec["image"][..., 0], expected)


def test_duplicates_are_grouped_and_reported(tmp_path):
    src = kaggle_source(tmp_path)
    a = src / "train" / "NORMAL" / "IM-0001-0001.jpeg"
    (src / "train" / "NORMAL" / "NORMAL2-IM-0500-0001.jpeg").write_bytes(a.read_bytes())
    (src / "train" / "PNEUMONIA" / "person99_virus_1.jpeg").write_bytes(
        (src / "train" / "NORMAL" / "IM-0002-0001.jpeg").read_bytes())
    m = run(src, tmp_path / "out")
    dup = m.data["duplicates"]
    assert ["train/NORMAL/IM-0001-0001.jpeg", "train/NORMAL/NORMAL2-IM-0500-0001.jpeg"] in dup[
        "within_split"]
    assert len(dup["across_classes"]) == 1
    rows = {r["path"]: r for r in m.data["files"]}
    assert rows["train/PNEUMONIA/person99_virus_1.jpeg"]["reason"].startswith("label conflict")
    # The two copies under different patient ids share a split.
    assert (rows["train/NORMAL/IM-0001-0001.jpeg"]["split"]
            == rows["train/NORMAL/NORMAL2-IM-0500-0001.jpeg"]["split"])


def test_leakage_into_official_test_is_refused(tmp_path):
    src = kaggle_source(tmp_path)
    t = next((src / "test" / "NORMAL").iterdir())
    (src / "train" / "NORMAL" / "IM-0999-0001.jpeg").write_bytes(t.read_bytes())
    with pytest.raises(LeakageError, match="content hash"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    m = run(src, tmp_path / "out2", allow_leakage=True)
    assert m.data["leakage_allowed"] and m.data["duplicates"]["across_splits"]
    # Re-splitting everything groups the copies together instead.
    m = run(src, tmp_path / "out3", resplit="all")
    assert not m.data["duplicates"]["across_splits"]
    assert set(m.splits) == {"train", "val", "test"}


def test_one_class_only_is_a_clear_error(tmp_path):
    write_image(tmp_path / "src" / "NORMAL" / "a.png")
    (tmp_path / "src" / "PNEUMONIA").mkdir()
    with pytest.raises(PrepareError, match="only class"):
        run(tmp_path / "src", tmp_path / "out")


def test_rerun_is_noop_and_other_options_need_overwrite(tmp_path):
    src = kaggle_source(tmp_path)
    m1 = run(src, tmp_path / "out")
    stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    m2 = run(src, tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp
    assert m2.data == m1.data
    with pytest.raises(PrepareError, match="--overwrite"):
        run(src, tmp_path / "out", image_size=16)
    m3 = run(src, tmp_path / "out", image_size=16, overwrite=True)
    assert m3.image_size == 16
    m3.verify()
    names = {p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".pneumo")}
    assert names == {"manifest.json", *METADATA_FILES} | {
        e["file"] for s in m3.splits for c in m3.classes for e in m3.shard_entries(s, c)}


def test_corrupted_or_truncated_shard_is_detected(tmp_path):
    m = run(kaggle_source(tmp_path), tmp_path / "out")
    m.verify()
    shard = Path(m.shard_paths("train", "pneumonia")[0])
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(manifest.ShardIntegrityError, match="sha256"):
        m.verify()
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(manifest.ShardIntegrityError, match="truncated"):
        m.verify(checksums=False)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(manifest.ManifestError, match="no manifest.json"):
        manifest.load_manifest(tmp_path)


@pytest.mark.slow
def test_killed_run_leaves_no_manifest_and_rerun_recovers(tmp_path):
    src = kaggle_source(tmp_path)
    out = tmp_path / "out"
    # A child that is killed in the middle of writing shards.
    code = (
        "import sys, os, signal\n"
        "from pneumo_data import records_tf\n"
        "original = records_tf.ShardWriter.close\n"
        "def close(self):\n"
        "    entry = original(self)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "records_tf.ShardWriter.close = close\n"
        "from pneumo_data.prepare import PrepareConfig, prepare\n"
        f"prepare(PrepareConfig(source_dir={str(src)!r}, output_dir={str(out)!r}, "
        "image_size=32, progress=False))\n")
    proc = run_code(code)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    assert list(out.glob("*.tfrecord"))  # something half-done was left
    with pytest.raises(manifest.ManifestError):
        manifest.load_manifest(out)
    m = run(src, out)
    m.verify()
    assert not list(out.glob("*partial*"))


def test_embedded_default_dataset_prepares(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMO_CACHE", str(tmp_path / "cache"))
    from pneumo_data import synthetic
    monkeypatch.setattr(synthetic, "DEFAULT_COUNTS", {
        ("train", "normal"): 6, ("train", "pneumonia"): 10,
        ("test", "normal"): 3, ("test", "pneumonia"): 3})
    m = prepare(PrepareConfig(output_dir=str(tmp_path / "out"), image_size=32, progress=False))
    assert m.count("test") == 6 and m.count("train") + m.count("val") == 16
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"]["dir"].startswith(
        str(tmp_path / "cache"))


@pytest.mark.slow
def test_cli_reports_errors_without_traceback(tmp_path):
    proc = cli(f"--source_dir={tmp_path}", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode != 0
    assert "prepare: error:" in proc.stderr and "unknown layout" in proc.stderr
    assert "Traceback" not in proc.stderr


def cli(*args, timeout=300):
    """The ingest job as a user runs it (no log-level override)."""
    return run_module("pneumo_data.prepare", "--noprogress", *args, timeout=timeout,
                      env={"TF_CPP_MIN_LOG_LEVEL": None})


@pytest.mark.slow
def test_a_folder_holding_a_users_files_is_refused_and_left_untouched(tmp_path):
    src = kaggle_source(tmp_path)
    out = tmp_path / "u"
    out.mkdir()
    mine = out / "mine.tfrecord"
    mine.write_bytes(os.urandom(5000))
    before = mine.read_bytes()
    proc = cli(f"--source_dir={src}", f"--output_dir={out}", "--image_size=32")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "prepare: error:" in proc.stderr and "mine.tfrecord" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mine.tfrecord"]
    assert mine.read_bytes() == before
    # --overwrite does not change that: it only ever replaces prepare's own files.
    proc = cli(f"--source_dir={src}", f"--output_dir={out}", "--image_size=32", "--overwrite")
    assert proc.returncode == 1 and mine.read_bytes() == before


def test_overwrite_keeps_a_users_file_added_to_a_prepared_folder(tmp_path):
    src = kaggle_source(tmp_path)
    out = tmp_path / "out"
    run(src, out)
    (out / "notes.txt").write_text("mine")
    m = run(src, out, image_size=16, overwrite=True)
    m.verify()
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_folder_being_written_is_refused_at_once(tmp_path):
    from pneumo_data.common.outputs import OutputDir
    src = kaggle_source(tmp_path)
    out = tmp_path / "out"
    with OutputDir(out, "prepare"):
        proc = cli(f"--source_dir={src}", f"--output_dir={out}", "--image_size=32")
    assert proc.returncode == 1
    assert f"is being written by pid {os.getpid()}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_prepares_started_together_leave_one_verified_dataset(tmp_path):
    src = kaggle_source(tmp_path)
    out = tmp_path / "out"
    args = ["--noprogress", f"--source_dir={src}", f"--output_dir={out}", "--image_size=32",
            "--num_workers=1"]
    first = start_module("pneumo_data.prepare", *args)
    import time
    time.sleep(0.3)
    second = run_module("pneumo_data.prepare", *args)
    _, first_err = first.communicate(timeout=300)
    codes = sorted([first.returncode, second.returncode])
    assert codes in ([0, 0], [0, 1]), (first_err[-1500:], second.stderr[-1500:])
    for code, err in ((first.returncode, first_err), (second.returncode, second.stderr)):
        assert "Traceback" not in err
        if code == 1:
            assert "is being written by pid" in err
    m = manifest.load_manifest(out)
    m.verify(checksums=True)
    rerun = run(src, out)  # and a third run finds it complete
    assert rerun.data == m.data


def test_up_to_date_check_verifies_checksums_and_rewrites_a_damaged_dataset(tmp_path):
    src = kaggle_source(tmp_path)
    out = tmp_path / "out"
    m = run(src, out)
    shard = Path(m.shard_paths("train", "normal")[0])
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(PrepareError, match="damaged.*sha256"):
        run(src, out)
    m2 = run(src, out, overwrite=True)
    m2.verify(checksums=True)


def test_symlinks_dangling_links_and_unexpected_folders_are_recorded(tmp_path):
    src = kaggle_source(tmp_path)
    extra = tmp_path / "elsewhere"
    write_image(extra / "person77_virus_1.jpeg", value=200, seed=77)
    (src / "train" / "PNEUMONIA" / "linked").symlink_to(extra, target_is_directory=True)
    (src / "train" / "NORMAL" / "gone.jpeg").symlink_to(tmp_path / "missing.jpeg")
    (src / "train" / "PNEUMONIA" / "loop").symlink_to(src / "train" / "PNEUMONIA",
                                                      target_is_directory=True)
    (src / "extras").mkdir()
    write_image(src / "extras" / "IM-0999-0001.jpeg")
    (src / "README.txt").write_text("about")
    (src / "train" / "OTHER").mkdir()
    m = run(src, tmp_path / "out")
    rows = {r["path"]: r for r in m.data["files"]}
    assert rows["train/PNEUMONIA/linked/person77_virus_1.jpeg"]["status"] == "written"
    assert rows["train/NORMAL/gone.jpeg"]["status"] == "skipped"
    assert "dangling symbolic link" in rows["train/NORMAL/gone.jpeg"]["reason"]
    ignored = {i["path"]: i["reason"] for i in m.data["ignored"]}
    assert set(ignored) == {"extras", "README.txt", "train/OTHER", "train/PNEUMONIA/loop"}
    assert "not part of the layout" in ignored["extras"]
    assert "already walked" in ignored["train/PNEUMONIA/loop"]
    assert not any(p.startswith("train/PNEUMONIA/loop/") for p in rows)


def test_output_inside_the_source_is_refused(tmp_path):
    src = kaggle_source(tmp_path)
    with pytest.raises(PrepareError, match="inside --source_dir"):
        run(src, src / "train" / "prepared")
    assert not (src / "train" / "prepared").exists()


@pytest.mark.slow
def test_progress_output_reports_decode_rate_without_import_time(tmp_path):
    proc = run_module("pneumo_data.prepare", f"--source_dir={kaggle_source(tmp_path)}",
                      f"--output_dir={tmp_path / 'out'}", "--image_size=32",
                      env={"TF_CPP_MIN_LOG_LEVEL": None})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in ("cuInit", "absl::InitializeLog", "oneDNN", "cuda drivers", "cpu_feature_guard"):
        assert noise not in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"written (\d+) of \1 files in [\d.]+s \(\d+ img/s", proc.stdout), proc.stdout
    assert "%|" not in proc.stderr and "img/s]" not in proc.stderr  # no bars off a terminal


@pytest.mark.slow
def test_record_bytes_do_not_depend_on_the_process():
    # Protobuf map order follows a per-process hash seed unless serialized
    # deterministically; shards written by different processes (two runs, or
    # threads vs Beam workers) must still be byte-identical.
    code = ("import hashlib; from pneumo_data.records_tf import serialize; "
            "print(hashlib.sha256(serialize(dict(image=b'\\x01' * 64, label=1, subtype='viral', "
            "patient_id='p1', source_path='a/b.png', source_sha256='ab' * 32))).hexdigest())")
    runs = [run_code(code) for _ in range(3)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    digests = {r.stdout.strip() for r in runs}
    assert len(digests) == 1


# ---------------------------------------------------------------- inputs that used to go wrong

def test_a_file_name_that_is_not_utf8_is_skipped_with_its_reason(tmp_path):
    src = kaggle_source(tmp_path)
    odd = os.fsencode(src / "train" / "PNEUMONIA") + b"/person9008_bacteria_\xff\xfe.jpeg"
    with open(odd, "wb") as handle:
        handle.write((src / "train" / "PNEUMONIA" / "person1_virus_11.jpeg").read_bytes())
    m = run(src, tmp_path / "out")
    m.verify()
    (row,) = [r for r in m.data["files"] if "person9008" in r["path"]]
    assert row["status"] == "skipped" and "not valid UTF-8" in row["reason"]
    json.dumps(m.data)  # the manifest stays valid JSON


def test_a_symlink_loop_reaching_images_twice_skips_the_second_copies(tmp_path):
    src = kaggle_source(tmp_path)
    # NORMAL/loop -> .. : the train folder again, PNEUMONIA images now under NORMAL/ too.
    (src / "train" / "NORMAL" / "loop").symlink_to("..", target_is_directory=True)
    m = run(src, tmp_path / "out")
    m.verify()
    rows = {r["path"]: r for r in m.data["files"]}
    again = [r for p, r in rows.items() if p.startswith("train/NORMAL/loop/")]
    assert again and all(r["status"] == "skipped" for r in again)
    assert all("reached again through a symbolic link" in r["reason"] for r in again)
    first = rows["train/PNEUMONIA/person1_virus_11.jpeg"]
    assert first["status"] == "written" and first["label"] == "pneumonia"
    assert not [r for r in m.data["files"] if r["label"] == "normal"
                and "PNEUMONIA" in r["path"] and r["status"] == "written"]


def test_a_split_left_without_a_class_leaves_nothing_behind(tmp_path):
    src = kaggle_source(tmp_path)
    for split in ("train", "val"):  # every pneumonia image that could train: unreadable
        for image in (src / split / "PNEUMONIA").iterdir():
            image.write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match="train split has no pneumonia images") as error:
        run(src, out)
    assert "62 not an image" in str(error.value)  # the cause, with an example file
    assert "train/PNEUMONIA/person" in str(error.value)
    assert not out.exists()  # no shards left behind


def test_max_pixels_governs_above_pillows_own_bomb_limit(tmp_path):
    from PIL import Image as PILImage
    src = kaggle_source(tmp_path)
    big = src / "train" / "NORMAL" / "IM-0900-0001.png"
    pixels = np.zeros((9500, 9500), np.uint8)  # 90.25 Mpx: over Pillow's 89.48 Mpx
    pixels[::64] = 200
    PILImage.fromarray(pixels).save(big, compress_level=1)
    del pixels
    m = run(src, tmp_path / "default")
    (row,) = [r for r in m.data["files"] if r["path"].endswith("IM-0900-0001.png")]
    assert row["status"] == "skipped" and "--max_pixels" in row["reason"], row
    m = run(src, tmp_path / "raised", max_pixels=200_000_000)
    (row,) = [r for r in m.data["files"] if r["path"].endswith("IM-0900-0001.png")]
    assert row["status"] == "written", row


def test_csv_label_values_are_counted_and_near_misses_warned(tmp_path, caplog):
    from pneumo_data.common.config import with_leaves
    rows = [("n", "Normal"), ("p", "Pneumonia"), ("t", "Pnuemonia"), ("q", "pneumonia?")]
    lines = ["file,finding"]
    for k, (prefix, value) in enumerate(rows * 6):
        name = f"img/{prefix}{k}.png"
        write_image(tmp_path / "src" / name, value=70 if value == "Normal" else 180, seed=k)
        lines.append(f"{name},{value}")
    (tmp_path / "src" / "labels.csv").write_text("\n".join(lines) + "\n")
    config = with_leaves(PrepareConfig(), source_dir=str(tmp_path / "src"),
                         output_dir=str(tmp_path / "out"), image_size=32, progress=False,
                         labels_csv="labels.csv", path_column="file", label_column="finding",
                         positive_values="Pneumonia", val_fraction=0.2, test_fraction=0.2)
    with caplog.at_level("WARNING"):
        m = prepare(config)
    assert m.data["source"]["label_values"] == {
        "Normal": {"normal": 6}, "Pneumonia": {"pneumonia": 6},
        "Pnuemonia": {"normal": 6}, "pneumonia?": {"normal": 6}}
    warned = " ".join(m.data["source"]["label_warnings"])
    assert "'Pnuemonia' (6 row(s)) counted as normal" in warned and "'pneumonia?'" in warned
    assert "'Normal'" not in warned
    assert "Pnuemonia" in caplog.text and "--negative_values" in caplog.text


# ---------------------------------------------------------------- progress bars

def _on_a_terminal(*args: str) -> tuple[int, str]:
    """Runs prepare with its stderr on a pseudo-terminal; (exit status, what it showed)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 wide
    shown = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.run([sys.executable, "-m", "pneumo_data.prepare", *args],
                          stdout=subprocess.DEVNULL, stderr=follower, env=job_env(),
                          timeout=300)
    os.close(follower)
    reader.join(10)
    os.close(leader)
    return proc.returncode, shown.decode(errors="replace")


@pytest.mark.slow
def test_progress_bars_only_on_a_terminal_and_never_at_verbosity_minus_one(tmp_path):
    src = kaggle_source(tmp_path)
    code, shown = _on_a_terminal(f"--source_dir={src}", f"--output_dir={tmp_path / 'a'}",
                                 "--image_size=32")
    assert code == 0 and "img/s]" in shown, shown[-2000:]
    code, shown = _on_a_terminal(f"--source_dir={src}", f"--output_dir={tmp_path / 'b'}",
                                 "--image_size=32", "--verbosity=-1")
    assert code == 0 and "img/s]" not in shown and "%|" not in shown, shown[-2000:]
