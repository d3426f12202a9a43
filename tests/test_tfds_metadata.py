"""pneumo_data.tfds.metadata: a prepared folder read through TFDS, checked against its manifest."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from pneumo_data import manifest, records_tf
from pneumo_data.common.outputs import LEDGER_NAME, OutputDir, OutputError
from pneumo_data.prepare import PrepareConfig, prepare
from pneumo_data.tfds import metadata


def _prepare(src, out, **kw):
    kw.setdefault("image_size", 32)
    kw.setdefault("progress", False)
    kw.setdefault("shard_mb", 0.02)  # several shards per class
    return prepare(PrepareConfig(source_dir=str(src), output_dir=str(out), **kw))


def _records(m, split, label):
    """The manifest's own reading of a split x class: {source_path: (label, pixels)}."""
    result = {}
    for path in m.shard_paths(split, label):
        for raw in tf.data.TFRecordDataset(path):
            ex = records_tf.parse(raw, m.encoding, m.image_size)
            result[ex["source_path"].numpy().decode()] = (int(ex["label"]), ex["image"].numpy())
    return result


def _copy(m, dest):
    """A copy of a prepared folder (its ledger too, not its lock)."""
    shutil.copytree(m.data_dir, dest, ignore=shutil.ignore_patterns(".pneumo.lock"))
    return dest


@pytest.fixture(scope="module")
def raw_dir(synthetic_source, tmp_path_factory):
    return _prepare(synthetic_source, tmp_path_factory.mktemp("tfds-raw"))  # writes the metadata


def test_prepare_writes_the_metadata_through_its_ledger(raw_dir):
    files = sorted(p.name for p in raw_dir.data_dir.iterdir())
    assert set(metadata.METADATA_FILES) <= set(files)
    assert not [name for name in files if "partial" in name]
    ledger = json.loads((raw_dir.data_dir / LEDGER_NAME).read_text())
    assert set(metadata.METADATA_FILES) <= set(ledger["entries"])
    metadata.check_tfds_metadata(raw_dir.data_dir)


def test_tfds_lists_every_split_x_class_with_its_shards(raw_dir):
    m = raw_dir
    builder = tfds.builder_from_directory(str(m.data_dir))
    splits = builder.info.splits
    expected = {f"{s}-{label}" for s in m.splits for label in m.classes if m.count(s, label)}
    assert set(splits) == expected
    for s in m.splits:
        for label in m.classes:
            if m.count(s, label):
                info = splits[f"{s}-{label}"]
                assert info.num_examples == m.count(s, label)
                assert list(info.shard_lengths) == [e["records"] for e in m.shard_entries(s, label)]
    assert len(splits["train-pneumonia"].shard_lengths) > 1
    assert builder.info.features["label"].names == ["normal", "pneumonia"]
    assert builder.info.features["image"].shape == (32, 32, 1)
    assert "10.1016/j.cell.2018.02.010" in builder.info.citation
    assert "10.17632/rscbjbr9sj.2" in builder.info.citation


def test_as_dataset_reads_every_record_with_its_pixels_and_label(raw_dir):
    m = raw_dir
    builder = tfds.builder_from_directory(str(m.data_dir))
    for s in m.splits:
        want = {}
        for label in m.classes:
            want.update(_records(m, s, label))
        got = {}
        for ex in tfds.as_numpy(builder.as_dataset(split=metadata.split_spec(s, m.data_dir))):
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 1)
            got[ex["source_path"].decode()] = (int(ex["label"]), ex["image"])
        assert set(got) == set(want) and len(got) == m.count(s)
        for path, (label, pixels) in want.items():
            assert got[path][0] == label
            np.testing.assert_array_equal(got[path][1], pixels)


def test_per_class_splits_are_addressable_and_supervised(raw_dir):
    m = raw_dir
    builder = tfds.builder_from_directory(str(m.data_dir))
    for label_index, label in enumerate(m.classes):
        ds = builder.as_dataset(split=f"train-{label}", as_supervised=True)
        labels = [int(y) for _, y in tfds.as_numpy(ds)]
        assert len(labels) == m.count("train", label) and set(labels) == {label_index}
    half = builder.as_dataset(split="train-pneumonia[:50%]")
    assert 0 < sum(1 for _ in half) < m.count("train", "pneumonia")
    assert metadata.split_spec("train", manifest=m) == "train-normal+train-pneumonia"
    assert builder.info.metadata["splits"]["val"] == "val-normal+val-pneumonia"


def test_show_examples_draws_a_grid(raw_dir):
    import matplotlib
    matplotlib.use("Agg")
    builder = tfds.builder_from_directory(str(raw_dir.data_dir))
    fig = tfds.visualization.show_examples(builder.as_dataset(split="test-pneumonia"),
                                           builder.info, rows=2, cols=2)
    assert len(fig.axes) == 4
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (32, 32)
    assert "pneumonia" in fig.axes[0].get_xlabel()


def test_reading_through_tfds_changes_nothing_in_the_folder(raw_dir):
    raw_dir.verify(checksums=True)  # the records were read in place, not rewritten
    with OutputDir(raw_dir.data_dir, "prepare") as out:
        assert out.foreign() == []  # and TFDS left no file of its own there


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_encoded_shards_use_the_stock_image_feature(synthetic_source, tmp_path, encoding):
    m = _prepare(synthetic_source, tmp_path / encoding, encoding=encoding, shard_mb=64)
    builder = tfds.builder_from_directory(str(m.data_dir))
    feature = builder.info.features["image"]
    assert type(feature) is tfds.features.Image and feature.encoding_format == encoding
    want = _records(m, "val", "pneumonia")
    for ex in tfds.as_numpy(builder.as_dataset(split="val-pneumonia")):
        np.testing.assert_array_equal(ex["image"], want[ex["source_path"].decode()][1])


def test_mismatch_with_the_manifest_is_detected(raw_dir, tmp_path):
    copy = _copy(raw_dir, tmp_path / "copy")
    metadata.check_tfds_metadata(copy)  # consistent as written
    path = copy / manifest.MANIFEST_NAME
    data = json.loads(path.read_text())
    entry = data["shards"]["train"]["normal"][0]
    entry["records"] -= 1
    path.write_text(json.dumps(data))
    with pytest.raises(metadata.TfdsMetadataError, match="shard lengths"):
        metadata.check_tfds_metadata(copy)
    with pytest.raises(metadata.TfdsMetadataError):
        metadata.load_builder(copy)


def test_metadata_of_another_preparation_is_detected(synthetic_source, raw_dir, tmp_path):
    other = _prepare(synthetic_source, tmp_path / "other", image_size=40)
    copy = _copy(raw_dir, tmp_path / "copy")
    for name in metadata.METADATA_FILES:
        shutil.copyfile(other.data_dir / name, copy / name)
    with pytest.raises(metadata.TfdsMetadataError, match="does not decode raw images of size 32"):
        metadata.check_tfds_metadata(copy)


@pytest.mark.parametrize("damage", ["missing", "stale"])
def test_rerun_of_prepare_rewrites_missing_or_stale_metadata(synthetic_source, raw_dir, tmp_path,
                                                              damage):
    # A folder prepared before prepare wrote TFDS metadata has none; a hand-edited one is stale.
    copy = _copy(raw_dir, tmp_path / "copy")
    if damage == "missing":
        for name in metadata.METADATA_FILES:
            (copy / name).unlink()
        ledger = json.loads((copy / LEDGER_NAME).read_text())
        for name in metadata.METADATA_FILES:
            del ledger["entries"][name]
        (copy / LEDGER_NAME).write_text(json.dumps(ledger))
        match = "has no TFDS metadata"
    else:
        info = json.loads((copy / "metadata.json").read_text())
        info["pneumo_manifest_digest"] = "0" * 64
        (copy / "metadata.json").write_text(json.dumps(info))
        match = "recorded digest differs"
    with pytest.raises(metadata.TfdsMetadataError, match=match):
        metadata.check_tfds_metadata(copy)
    shard_times = {p.name: p.stat().st_mtime_ns for p in copy.glob("*.tfrecord")}
    manifest_before = (copy / manifest.MANIFEST_NAME).read_bytes()
    _prepare(synthetic_source, copy)  # up to date: writes only the metadata
    metadata.check_tfds_metadata(copy)
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("*.tfrecord")} == shard_times
    assert (copy / manifest.MANIFEST_NAME).read_bytes() == manifest_before
    ledger = json.loads((copy / LEDGER_NAME).read_text())
    assert set(metadata.METADATA_FILES) <= set(ledger["entries"])
    for name in metadata.METADATA_FILES:  # byte for byte what prepare wrote in the first place
        assert (copy / name).read_bytes() == (raw_dir.data_dir / name).read_bytes(), name


def test_missing_metadata_is_a_clear_error(raw_dir, tmp_path):
    copy = _copy(raw_dir, tmp_path / "copy")
    (copy / "dataset_info.json").unlink()
    with pytest.raises(metadata.TfdsMetadataError, match="has no TFDS metadata"):
        metadata.check_tfds_metadata(copy)
    with pytest.raises(metadata.TfdsMetadataError, match="has no TFDS metadata"):
        metadata.load_builder(copy)


def test_write_from_the_manifest_dict_before_it_is_on_disk(raw_dir, tmp_path):
    # prepare writes the TFDS files before manifest.json (which marks a complete output).
    copy = _copy(raw_dir, tmp_path / "copy")
    data = json.loads((copy / manifest.MANIFEST_NAME).read_text())
    with OutputDir(copy, "prepare") as out:
        for name in (*metadata.METADATA_FILES, manifest.MANIFEST_NAME):
            out.remove(name)
        written = metadata.write_tfds_metadata(out, data)
    assert sorted(p.name for p in written) == sorted(metadata.METADATA_FILES)
    assert not list(copy.glob("*.partial*"))
    assert not (copy / manifest.MANIFEST_NAME).exists()
    assert tfds.builder_from_directory(str(copy)).info.splits["val-normal"].num_examples > 0


def test_by_hand_on_a_folder_pneumo_did_not_prepare_is_refused(raw_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for path in raw_dir.data_dir.iterdir():  # the same files, without prepare's ledger
        if not path.name.startswith(".pneumo") and path.name not in metadata.METADATA_FILES:
            shutil.copyfile(path, foreign / path.name)
    with pytest.raises(OutputError, match="pneumo did not write"):
        metadata.write_tfds_metadata(foreign)
    assert not [p for p in os.listdir(foreign) if p in metadata.METADATA_FILES]


def test_tfds_name_is_not_shadowed_by_the_subpackage():
    import pneumo_data.tfds as ours
    assert ours.__name__ == "pneumo_data.tfds"
    assert tfds.__name__ == "tensorflow_datasets"
    assert hasattr(tfds, "builder_from_directory")


@pytest.mark.parametrize("source", ["rsna", "csv"])
def test_other_sources_are_cited_as_themselves_not_as_kermany(tmp_path, source):
    from pneumo_data.common.config import with_leaves
    from tests import source_layouts
    if source == "rsna":
        source_layouts.write_rsna(tmp_path / "src", n=16)
        leaves, doi = {}, "10.1148/ryai.2019180041"
    else:
        source_layouts.write_export(tmp_path / "src", n=16)
        leaves = dict(labels_csv="labels.csv", path_column="file", label_column="finding",
                      positive_values="Pneumonia", negative_values="No Finding")
        doi = None
    m = prepare(with_leaves(PrepareConfig(), source_dir=str(tmp_path / "src"),
                            output_dir=str(tmp_path / "out"), image_size=24, progress=False,
                            val_fraction=0.25, **leaves))
    builder = tfds.builder_from_directory(str(m.data_dir))
    assert "10.1016/j.cell.2018.02.010" not in builder.info.citation
    if doi:
        assert doi in builder.info.citation
    else:
        assert builder.info.citation == "" and "cite that source" in builder.info.description
    got = sum(1 for _ in builder.as_dataset(split=metadata.split_spec("train", manifest=m)))
    assert got == m.count("train")
