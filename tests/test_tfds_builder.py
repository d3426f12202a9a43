"""The chest_xray_pneumonia TFDS builder: pneumo's split and decode, read by pneumo's pipeline."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import pneumo_data
from pneumo_data.prepare import PrepareConfig, prepare
from pneumo_data.tfds.chest_xray_pneumonia import Builder, ChestXrayConfig, ManualDirError
from tests.helpers import make_kaggle_tree, run_module

SMALL = ChestXrayConfig(name="t32", image_size=32, seed=7)


@pytest.fixture(scope="module")
def kaggle_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle")
    names_n = [f"IM-{p:04d}-000{k}.jpeg" for p in range(1, 13) for k in (1, 2)]
    names_p = [f"person{p}_{'virus' if p % 2 else 'bacteria'}_{p}{k}.jpeg"
               for p in range(1, 19) for k in (1, 2)]
    src = make_kaggle_tree(root / "chest_xray", {  # nested as in the Kaggle archive
        "train": {"NORMAL": names_n[:18], "PNEUMONIA": names_p[:26]},
        "val": {"NORMAL": names_n[18:20], "PNEUMONIA": names_p[26:28]},
        "test": {"NORMAL": names_n[20:], "PNEUMONIA": names_p[28:]},
    })
    (src / "train" / "PNEUMONIA" / "person99_virus_1.jpeg").write_bytes(b"not a jpeg")
    from tests import dicom_files  # a DICOM among the JPEGs: its header goes into its row
    dicom_files.write(src / "train" / "PNEUMONIA" / "scan1.dcm",
                      dicom_files.make_dataset(dicom_files.gradient(), PatientID="DCM-1"))
    return root


def _build(kaggle_dir, data_dir, config=SMALL, **download):
    builder = Builder(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(kaggle_dir), **download))
    return builder


@pytest.fixture(scope="module")
def built(kaggle_dir, tmp_path_factory):
    return _build(kaggle_dir, tmp_path_factory.mktemp("tfds"))


def _manifest(data_dir):
    return json.loads((Path(data_dir) / "manifest.json").read_text())


def _records(data_dir):
    """source_path -> (split, every feature's value) over every shard the manifest lists."""
    m = _manifest(data_dir)
    result = {}
    for split, by_class in m["shards"].items():
        for entries in by_class.values():
            for e in entries:
                for raw in tf.data.TFRecordDataset(str(Path(data_dir) / e["file"])):
                    example = tf.train.Example.FromString(raw.numpy()).features.feature
                    values = {key: tuple(f.bytes_list.value) or tuple(f.int64_list.value)
                              for key, f in example.items()}
                    result[values["source_path"][0].decode()] = (split, values)
    return result


def _without_shard(rows):
    return [{k: v for k, v in row.items() if k != "shard"} for row in rows]


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_same_split_and_records_as_prepare_for_the_same_seed(built, kaggle_dir, tmp_path,
                                                             encoding):
    if encoding == "raw":
        ours = built
    else:
        ours = _build(kaggle_dir, tmp_path / "tfds", dataclasses.replace(
            SMALL, name="t32jpeg", encoding="jpeg", jpeg_quality=80))
    prepared = prepare(PrepareConfig(source_dir=str(kaggle_dir), output_dir=str(tmp_path / "p"),
                                     image_size=32, seed=7, encoding=encoding, jpeg_quality=80,
                                     progress=False))
    theirs = prepared.data
    mine = _manifest(ours.data_dir)
    assert mine["counts"] == theirs["counts"]
    # Every file's row (status, split, reason, ...) but the shard's name, which is TFDS's.
    assert _without_shard(mine["files"]) == _without_shard(theirs["files"])
    assert {k: mine[k] for k in ("ignored", "duplicates", "source", "image", "classes")} == \
        {k: theirs[k] for k in ("ignored", "duplicates", "source", "image", "classes")}
    rows = {r["path"]: r for r in mine["files"]}
    assert rows["chest_xray/train/PNEUMONIA/person99_virus_1.jpeg"]["reason"].startswith(
        "not an image")
    assert rows["chest_xray/train/PNEUMONIA/scan1.dcm"]["dicom"]["voi"]
    # The records hold prepare's bytes (image included), though TFDS orders and shards them
    # its own way.
    assert _records(ours.data_dir) == _records(prepared.data_dir)


def test_tfds_splits_per_class_and_features(built):
    counts = _manifest(built.data_dir)["counts"]
    splits = built.info.splits
    assert {name: info.num_examples for name, info in splits.items()} == {
        f"{s}-{label}": n for s, by_class in counts.items() for label, n in by_class.items()}
    ds = built.as_dataset(split="train-normal+train-pneumonia")
    images = list(tfds.as_numpy(ds))
    assert len(images) == sum(counts["train"].values())
    assert images[0]["image"].shape == (32, 32, 1) and images[0]["image"].dtype == np.uint8
    assert built.info.features["label"].names == ["normal", "pneumonia"]
    assert "10.1016/j.cell.2018.02.010" in built.info.citation


def test_pneumo_pipeline_reads_the_tfds_folder(built):
    data_dir = built.data_dir
    counts = _manifest(data_dir)["counts"]
    labels = np.concatenate([y.numpy().ravel() for _, y in
                             pneumo_data.eval_dataset(data_dir, "test", image_size=32)])
    assert len(labels) == sum(counts["test"].values())
    assert int(labels.sum()) == counts["test"]["pneumonia"]
    train = pneumo_data.train_dataset(data_dir, image_size=32, batch_size=16, seed=0,
                                      deterministic=True)
    images, labels = next(iter(train))
    assert images.shape == (16, 32, 32, 1) and images.dtype == tf.uint8
    assert 0 < float(tf.reduce_sum(labels)) < 16  # both classes in the balanced stream


def test_missing_or_wrong_manual_dir_explains_what_to_download(tmp_path):
    with pytest.raises(Exception, match="chest-xray-pneumonia"):
        _build(tmp_path / "absent", tmp_path / "tfds")
    (tmp_path / "wrong" / "images").mkdir(parents=True)
    with pytest.raises(ManualDirError, match="unknown layout(.|\n)*paultimothymooney"):
        _build(tmp_path / "wrong", tmp_path / "tfds2")


@pytest.mark.beam
@pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None
                    or importlib.util.find_spec("mlcroissant") is None,
                    reason="the tfds CLI imports apache_beam and mlcroissant "
                           "(tensorflow/datasets#5463)")
def test_tfds_build_cli(kaggle_dir, tmp_path):
    proc = run_module("tensorflow_datasets.scripts.cli.main", "build", "chest_xray_pneumonia/224",
                      "--imports=pneumo_data.tfds.chest_xray_pneumonia",
                      f"--manual_dir={kaggle_dir}", f"--data_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    builder = tfds.builder_from_directory(str(tmp_path / "chest_xray_pneumonia" / "224" / "1.0.0"))
    assert builder.info.features["image"].shape == (224, 224, 1)
    m = _manifest(builder.data_dir)
    assert m["tfds"] == {"name": "chest_xray_pneumonia", "config": "224", "version": "1.0.0"}
    assert sum(builder.info.splits[s].num_examples for s in builder.info.splits) == \
        sum(sum(c.values()) for c in m["counts"].values())


@pytest.mark.beam
def test_beam_path_writes_the_same_examples(built, kaggle_dir, tmp_path):
    pytest.importorskip("apache_beam", reason="apache-beam is not installed (extra 'beam')")
    from apache_beam.options.pipeline_options import PipelineOptions
    options = PipelineOptions(["--runner=FnApiRunner", "--direct_num_workers=2",
                               "--direct_running_mode=multi_processing"])
    beam_built = _build(kaggle_dir, tmp_path, beam_options=options)
    assert _records(beam_built.data_dir) == _records(built.data_dir)
    ours, theirs = _manifest(beam_built.data_dir), _manifest(built.data_dir)
    assert ours["counts"] == theirs["counts"]
    assert ours["files"] == theirs["files"]  # the DICOM's header info included
