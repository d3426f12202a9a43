import hashlib
import shutil

import numpy as np
import pytest
import tensorflow as tf

import pneumo_data
from pneumo_data import manifest, reader


def take(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def image_keys(batches):
    return [hashlib.md5(img.tobytes()).hexdigest() for x, _ in batches for img in x]


@pytest.mark.parametrize("weights,target", [(None, 0.5), ("normal=3,pneumonia=1", 0.25),
                                            ({"pneumonia": 1.0}, 1.0)])
def test_rebalanced_within_two_points_over_10000(prepared, weights, target):
    ds = pneumo_data.train_dataset(prepared, batch_size=100, image_size=16, seed=0,
                                   class_weights=weights, augment="none")
    labels = np.concatenate([y for _, y in take(ds, 100)])
    assert labels.shape == (10_000, 1)
    assert abs(labels.mean() - target) <= 0.02


def test_batches_are_uint8_single_channel(prepared):
    x, y = take(pneumo_data.train_dataset(prepared, batch_size=8, image_size=24), 1)[0]
    assert x.dtype == np.uint8 and x.shape == (8, 24, 24, 1)
    assert y.dtype == np.float32 and y.shape == (8, 1) and set(np.unique(y)) <= {0.0, 1.0}


def test_order_differs_between_epochs(prepared):
    steps = pneumo_data.steps_per_epoch(prepared, batch_size=10)
    m = manifest.load_manifest(prepared)
    assert steps == m.count("train") // 10
    batches = take(pneumo_data.train_dataset(prepared, batch_size=10, image_size=16, seed=1,
                                             augment="none"), 2 * steps)
    first, second = image_keys(batches[:steps]), image_keys(batches[steps:])
    assert first != second
    assert len(set(first) & set(second)) > len(first) // 3  # same images, new order


@pytest.mark.slow
def test_same_seed_same_stream_when_deterministic(prepared):
    def stream(seed):
        ds = pneumo_data.train_dataset(prepared, batch_size=8, image_size=16, seed=seed,
                                       deterministic=True, augment="host")
        return take(ds, 12)
    a, b, c = stream(5), stream(5), stream(6)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_eval_covers_each_example_exactly_once(prepared):
    m = manifest.load_manifest(prepared)
    for split in m.splits:
        ds = pneumo_data.eval_dataset(prepared, split, batch_size=7, image_size=16,
                                      with_metadata=True)
        paths, labels = [], []
        for _, y, meta in ds:
            paths += [p.decode() for p in meta["source_path"].numpy()]
            labels += list(y.numpy()[:, 0])
        expected = {r["path"]: r["label"] for r in m.data["files"]
                    if r["status"] == "written" and r["split"] == split}
        assert len(paths) == len(set(paths)) == len(expected)
        assert len(paths) == pneumo_data.eval_size(prepared, split)
        assert set(paths) == set(expected)
        assert [expected[p] == "pneumonia" for p in paths] == [bool(v) for v in labels]
        again = [p.decode() for _, _, meta in ds for p in meta["source_path"].numpy()]
        assert again == paths  # fixed order


def test_eval_keeps_last_partial_batch(prepared):
    n = pneumo_data.eval_size(prepared, "test")
    sizes = [len(y) for _, y in pneumo_data.eval_dataset(prepared, "test", batch_size=n - 1,
                                                          image_size=8)]
    assert sizes == [n - 1, 1]


def test_disk_cache_and_no_cache_give_same_images(prepared, tmp_path):
    kw = dict(batch_size=4, image_size=16, seed=2, deterministic=True, augment="none")
    a = take(pneumo_data.train_dataset(prepared, cache=False, **kw), 5)
    b = take(pneumo_data.train_dataset(prepared, cache=str(tmp_path / "c" / "cache"), **kw), 5)
    for (xa, _), (xb, _) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
    assert list((tmp_path / "c").iterdir())


@pytest.mark.slow
def test_input_context_shards_files_per_worker(synthetic_source, tmp_path):
    from pneumo_data.prepare import PrepareConfig, prepare
    out = tmp_path / "many"
    prepare(PrepareConfig(source_dir=str(synthetic_source), output_dir=str(out), image_size=16,
                          shard_mb=0.01, progress=False))
    seen = []
    for worker in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                         num_replicas_in_sync=2)
        ds = pneumo_data.train_dataset(out, batch_size=8, image_size=16, seed=0,
                                       input_context=ctx, augment="none")
        batches = take(ds, 40)
        assert batches[0][0].shape[0] == 4  # per-replica batch
        seen.append(set(image_keys(batches)))
    assert not seen[0] & seen[1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=0), "image_size must be a positive"),
    (dict(batch_size=-1), "batch_size must be a positive"),
    (dict(class_weights="normal=-1,pneumonia=1"), "non-negative"),
    (dict(class_weights={"normal": 0, "pneumonia": 0}), "all be zero"),
    (dict(class_weights={"covid": 1}), "unknown class"),
    (dict(augment="gpu"), "augment must be one of"),
])
def test_bad_arguments_are_clear_errors(prepared, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pneumo_data.train_dataset(prepared, **kwargs)


def test_missing_manifest_and_split(prepared, tmp_path):
    with pytest.raises(manifest.ManifestError, match="no manifest.json"):
        pneumo_data.train_dataset(tmp_path)
    with pytest.raises(manifest.ManifestError, match="no split 'holdout'"):
        pneumo_data.eval_dataset(prepared, "holdout")


def test_damaged_shard_is_named(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    m = manifest.load_manifest(copy)
    shard = copy / m.shard_entries("train", "normal")[0]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(manifest.ShardIntegrityError, match=shard.name):
        pneumo_data.train_dataset(copy)
    shard.write_bytes(bytes(data[:-50]))
    with pytest.raises(manifest.ShardIntegrityError, match=f"{shard.name}.*truncated"):
        pneumo_data.train_dataset(copy, verify_checksums=False)


def test_parse_class_weights_normalizes():
    assert reader.parse_class_weights("normal=1,pneumonia=3", ("normal", "pneumonia")) == [
        0.25, 0.75]
    with pytest.raises(ValueError, match="expected"):
        reader.parse_class_weights("normal", ("normal", "pneumonia"))


# ---------------------------------------------------------------- the batch-level stream (issue 21)

def _class_images(prepared, image_size=16):
    """{label: set of image hashes} of the train split, from the unaugmented eval reader."""
    out = {}
    for x, y in pneumo_data.eval_dataset(prepared, "train", batch_size=64,
                                         image_size=image_size):
        for img, lab in zip(x.numpy(), y.numpy()[:, 0]):
            out.setdefault(float(lab), []).append(hashlib.md5(img.tobytes()).hexdigest())
    return out


def test_each_class_is_walked_once_per_pass_and_reshuffled(prepared):
    """Every image of a class appears exactly once in each pass of that class (consecutive
    blocks of N_c of its images), each pass in a new order, the classes balanced."""
    per_class = _class_images(prepared)
    ds = pneumo_data.train_dataset(prepared, batch_size=10, image_size=16, seed=3,
                                   augment="none", deterministic=True)
    seen = {label: [] for label in per_class}
    labels = []
    for x, y in take(ds, 120):
        for img, lab in zip(x, y[:, 0]):
            seen[float(lab)].append(hashlib.md5(img.tobytes()).hexdigest())
            labels.append(lab)
    for label, images in per_class.items():
        n = len(images)
        walk = seen[label]
        passes = [walk[k * n:(k + 1) * n] for k in range(len(walk) // n)]
        assert len(passes) >= 3
        for block in passes:
            assert sorted(block) == sorted(images)  # each image exactly once per pass
        assert len({tuple(block) for block in passes}) == len(passes)  # reshuffled
    assert abs(np.mean(labels) - 0.5) < 0.05


@pytest.mark.slow
def test_sampled_stream_keeps_host_augmentation_and_seeds(prepared):
    def stream(seed):
        return take(pneumo_data.train_dataset(prepared, batch_size=8, image_size=16,
                                              seed=seed, deterministic=True,
                                              augment="host"), 4)
    a, b = stream(1), stream(1)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert a[0][0].dtype == np.uint8 and a[0][0].shape == (8, 16, 16, 1)


@pytest.mark.slow
def test_batch_level_stream_has_the_element_graphs_distribution(prepared):
    """The memory-cached (batch-level) stream and the per-element graph (no cache) give the
    same class mix and the same images (each class walked once per pass in both)."""
    kw = dict(batch_size=20, image_size=16, seed=4, augment="none", deterministic=True)
    per_class = _class_images(prepared)
    for cache in ("memory", "none"):
        batches = take(pneumo_data.train_dataset(prepared, cache=cache, **kw), 60)
        labels = np.concatenate([y for _, y in batches])[:, 0]
        assert abs(labels.mean() - 0.5) < 0.05, cache
        seen = {0.0: set(), 1.0: set()}
        for x, y in batches:
            for img, lab in zip(x, y[:, 0]):
                seen[float(lab)].add(hashlib.md5(img.tobytes()).hexdigest())
        for label, images in per_class.items():
            assert seen[label] == set(images), cache


@pytest.mark.slow
def test_residency_device_returns_the_resident_set_and_auto_keeps_the_stream_on_cpu(
        prepared, caplog):
    from pneumo_data import resident
    config = pneumo_data.PipelineConfig(batch_size=8, image_size=16, residency="device")
    source = pneumo_data.read(prepared, config, mode="train", seed=0)
    assert isinstance(source, resident.ResidentTrainSet)
    x, y = tf.function(source.next_batch)()
    assert x.dtype == tf.uint8 and x.shape == (8, 16, 16, 1) and y.shape == (8, 1)
    auto = pneumo_data.train_dataset(prepared, batch_size=8, image_size=16, residency="auto")
    assert isinstance(auto, tf.data.Dataset)
    assert any("automatic on GPUs only" in r.getMessage() for r in caplog.records)
    with pytest.raises(pneumo_data.common.errors.UserError, match="residency"):
        pneumo_data.PipelineConfig(residency="gpu").validate()
