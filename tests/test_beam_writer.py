"""prepare --runner=beam: the Beam pipeline writes what the threaded prepare writes.

The Beam tests need apache-beam (the optional ``beam`` extra); here it lives in its own
virtualenv (it would downgrade protobuf, pillow and pyarrow in the shared interpreter):
``/work/venvs/beam/bin/python -m pytest tests/test_beam_writer.py``.
"""

import json
import sys
from pathlib import Path

import pytest

from pneumo_data import beam_writer, manifest
from pneumo_data.common.errors import UserError
from pneumo_data.common.outputs import LEDGER_NAME
from pneumo_data.prepare import PrepareConfig, PrepareError, prepare
from tests.helpers import make_kaggle_tree

NO_BEAM = "apache-beam is not installed (optional extra 'beam'; see setup.cfg)"
TWO_PROCESSES = ("--runner=DirectRunner --direct_num_workers=2 "
                 "--direct_running_mode=multi_processing")


def _source(tmp_path):
    """Kaggle layout with several images per patient, an undecodable file, an empty one and
    DICOMs (their header info goes into the manifest rows)."""
    from tests import dicom_files
    names_n = [f"IM-{p:04d}-000{k}.jpeg" for p in range(1, 16) for k in (1, 2)]
    names_p = [f"person{p}_{'virus' if p % 3 else 'bacteria'}_{p * 10 + k}.png"
               for p in range(1, 26) for k in (1, 2)]
    src = make_kaggle_tree(tmp_path / "src", {
        "train": {"NORMAL": names_n[:24], "PNEUMONIA": names_p[:40]},
        "val": {"NORMAL": names_n[24:26], "PNEUMONIA": names_p[40:42]},
        "test": {"NORMAL": names_n[26:], "PNEUMONIA": names_p[42:]},
    })
    whole = (src / "train" / "NORMAL" / "IM-0001-0001.jpeg").read_bytes()
    (src / "train" / "NORMAL" / "IM-0001-0003.jpeg").write_bytes(whole[: len(whole) // 3])
    (src / "train" / "PNEUMONIA" / "person2_virus_99.png").write_bytes(b"")
    for k, cls in enumerate(("NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA")):
        pixels = dicom_files.gradient(seed=k)
        dicom_files.write(src / "train" / cls / f"scan{k}.dcm",
                          dicom_files.make_dataset(pixels, PatientID=f"DCM-{k}"))
    return src


def _without_timing(data):
    return {k: v for k, v in data.items() if k not in ("created", "seconds")}


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".pneumo"))


def test_missing_beam_is_a_clear_error_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # import fails as if absent
    config = PrepareConfig(source_dir=str(tmp_path / "absent"), output_dir=str(tmp_path / "out"),
                           runner="beam")
    with pytest.raises(beam_writer.BeamUnavailableError, match=r"pneumo\[beam\]"):
        prepare(config)
    assert issubclass(beam_writer.BeamUnavailableError, UserError)
    assert not (tmp_path / "out").exists()  # failed before reading the sources or the output


def test_beam_options_need_the_beam_runner(tmp_path):
    with pytest.raises(PrepareError, match="needs --runner=beam"):
        prepare(PrepareConfig(output_dir=str(tmp_path / "out"),
                              beam_pipeline_options="--direct_num_workers=2"))


@pytest.mark.beam
def test_beam_output_is_identical_to_the_threaded_prepare(tmp_path):
    pytest.importorskip("apache_beam", reason=NO_BEAM)
    src = _source(tmp_path)
    options = dict(source_dir=str(src), image_size=24, progress=False, shard_mb=0.004, seed=5)
    threaded = prepare(PrepareConfig(output_dir=str(tmp_path / "threads"), **options))
    beam = prepare(PrepareConfig(output_dir=str(tmp_path / "beam"), runner="beam",
                                 beam_pipeline_options=TWO_PROCESSES, **options))
    # Same manifest: shard table (names, records, bytes, sha256), counts, every file's row.
    assert _without_timing(beam.data) == _without_timing(threaded.data)
    rows = {r["path"]: r for r in beam.data["files"]}
    assert rows["train/NORMAL/IM-0001-0003.jpeg"]["status"] == "skipped"
    assert rows["train/PNEUMONIA/person2_virus_99.png"]["reason"].startswith("empty file")
    assert rows["train/NORMAL/scan0.dcm"]["status"] == "written"
    assert rows["train/NORMAL/scan0.dcm"]["dicom"]["voi"]  # read by a Beam worker, kept
    assert len(threaded.shard_entries("train", "pneumonia")) > 2
    # Same files (shards and TFDS metadata), byte for byte; the work folder is gone.
    names = _visible(tmp_path / "threads")
    assert _visible(tmp_path / "beam") == names
    for name in names:
        if name != manifest.MANIFEST_NAME:
            assert (tmp_path / "beam" / name).read_bytes() == \
                (tmp_path / "threads" / name).read_bytes(), name
    ledgers = [json.loads((tmp_path / run / LEDGER_NAME).read_text())["entries"]
               for run in ("threads", "beam")]
    assert ledgers[0] == ledgers[1]
    beam.verify(checksums=True)
    # The runner does not change the output: a threaded re-run finds the Beam folder up to date.
    stamp = (tmp_path / "beam" / manifest.MANIFEST_NAME).stat().st_mtime_ns
    prepare(PrepareConfig(output_dir=str(tmp_path / "beam"), **options))
    assert (tmp_path / "beam" / manifest.MANIFEST_NAME).stat().st_mtime_ns == stamp


@pytest.mark.beam
def test_a_failed_beam_run_leaves_no_manifest_and_the_next_run_recovers(tmp_path, monkeypatch):
    pytest.importorskip("apache_beam", reason=NO_BEAM)
    from pneumo_data import shard_writer
    src = _source(tmp_path)
    out = tmp_path / "out"
    options = dict(source_dir=str(src), image_size=16, progress=False, shard_mb=0.004)
    real = shard_writer.encode_record

    def failing(entry, config):
        if entry.source.relpath == "test/PNEUMONIA/person25_virus_251.png":
            raise RuntimeError("worker died")
        return real(entry, config)

    monkeypatch.setattr(shard_writer, "encode_record", failing)
    with pytest.raises(Exception, match="worker died"):  # Beam wraps the worker's error
        prepare(PrepareConfig(output_dir=str(out), runner="beam",
                              beam_pipeline_options="--runner=FnApiRunner", **options))
    assert not (out / manifest.MANIFEST_NAME).exists()
    assert not (out / ".beam-work.partial").exists()
    monkeypatch.undo()
    again = prepare(PrepareConfig(output_dir=str(out), **options))
    again.verify(checksums=True)
    shards = {e["file"] for s in again.splits for c in again.classes
              for e in again.shard_entries(s, c)}
    assert not [name for name in _visible(out) if name.endswith(".tfrecord")
                and name not in shards]
    assert not [name for name in _visible(out) if "partial" in name]


@pytest.mark.beam
def test_pipeline_options_from_a_flag_string():
    pytest.importorskip("apache_beam", reason=NO_BEAM)
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions
    options = beam_writer.pipeline_options(TWO_PROCESSES)
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    assert options.view_as(DirectOptions).direct_num_workers == 2
    default = beam_writer.pipeline_options("")
    assert default.view_as(DirectOptions).direct_running_mode == "multi_processing"
    with pytest.raises(UserError, match="No closing quotation"):
        beam_writer.pipeline_options("--runner='Flink")
