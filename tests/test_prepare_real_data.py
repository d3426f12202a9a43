"""Integration: prepare the real chest_xray_224 folder (skipped when absent)."""

import os
from collections import defaultdict

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pneumo_data import records_tf
from pneumo_data.prepare import PrepareConfig, prepare

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


@pytest.fixture(scope="module")
def prepared_224(shared_data, tmp_path_factory):
    src = shared_data / "chest_xray_224"
    out = tmp_path_factory.mktemp("real224")
    return src, prepare(PrepareConfig(source_dir=str(src), output_dir=str(out), progress=False))


def test_every_file_accounted_for(prepared_224):
    src, m = prepared_224
    on_disk = {os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/")
               for d, _, files in os.walk(src) for f in files}
    rows = m.data["files"]
    assert len(rows) == len(on_disk) and {r["path"] for r in rows} == on_disk
    assert all(r["status"] in ("written", "skipped") for r in rows)
    assert all(r["reason"] for r in rows if r["status"] == "skipped")


def test_counts_add_up_and_no_patient_in_two_splits(prepared_224):
    _, m = prepared_224
    written = [r for r in m.data["files"] if r["status"] == "written"]
    tally = defaultdict(int)
    splits_of = defaultdict(set)
    hash_splits = defaultdict(set)
    for r in written:
        tally[(r["split"], r["label"])] += 1
        splits_of[r["patient_id"]].add(r["split"])
        hash_splits[r["sha256"]].add(r["split"])
    for split_name, by_class in m.data["counts"].items():
        for label, n in by_class.items():
            assert tally[(split_name, label)] == n
            assert n == sum(e["records"] for e in m.shard_entries(split_name, label))
    assert all(len(s) == 1 for s in splits_of.values())
    assert all(len(s) == 1 for s in hash_splits.values())
    # The official train split holds 24 groups of byte-identical files.
    assert len(m.data["duplicates"]["within_split"]) == 24
    val_share = m.count("val") / (m.count("train") + m.count("val"))
    assert abs(val_share - 0.15) < 0.01
    m.verify()


def test_shard_pixels_match_the_resized_source(prepared_224):
    src, m = prepared_224
    checked = 0
    for split_name in m.splits:
        for label in m.classes:
            path = m.shard_paths(split_name, label)[0]
            for raw in tf.data.TFRecordDataset(path).take(8):
                rec = records_tf.parse(raw, m.encoding, m.image_size)
                source = src / rec["source_path"].numpy().decode()
                expected = np.asarray(Image.open(source).convert("L").resize(
                    (m.image_size, m.image_size), Image.Resampling.BILINEAR))
                got = rec["image"].numpy()[..., 0]
                assert np.abs(got.astype(int) - expected).mean() < 1.0, source
                checked += 1
    assert checked >= 16
