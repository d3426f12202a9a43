import json

import pytest

from pneumo_data.common.errors import UserError
from pneumo_models import distribute
from pneumo_models.distribute import DistributeError, parse_tf_config


def tf_config(cluster, task_type="worker", index=0):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_tf_config_workers_and_chief_rule():
    info = parse_tf_config(tf_config({"worker": ["a:1", "b:2"]}, index=1))
    assert (info.task_type, info.task_index, info.num_workers) == ("worker", 1, 2)
    assert not info.is_chief and info.address == "b:2"
    assert parse_tf_config(tf_config({"worker": ["a:1", "b:2"]}, index=0)).is_chief
    with_chief = {"chief": ["c:3"], "worker": ["a:1", "b:2"]}
    assert parse_tf_config(tf_config(with_chief, "chief", 0)).is_chief
    worker0 = parse_tf_config(tf_config(with_chief, "worker", 0))
    assert not worker0.is_chief and worker0.num_workers == 3


@pytest.mark.parametrize("text,match", [
    (None, "needs the TF_CONFIG environment variable"),
    ("  ", "needs the TF_CONFIG environment variable"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"task": {"type": "worker", "index": 0}}', "no 'cluster'"),
    ('{"cluster": {"worker": ["a:1"]}}', "needs 'task'"),
    (tf_config({"worker": ["a:1"], "ps": ["p:1"]}), r"task type\(s\) \['ps'\]"),
    (tf_config({"worker": ["a:1"]}, "chief"), "'chief' is not in the cluster"),
    (tf_config({"worker": ["a:1", "b:2"]}, index=2), "index 2 is outside"),
    (tf_config({"worker": ["a:1"]}, index=True), "index True is outside"),
    (tf_config({"worker": ["hostonly"]}), "'hostonly' is not 'host:port'"),
    (tf_config({"worker": []}), "non-empty list"),
    (tf_config({"chief": ["a:1", "b:2"], "worker": ["c:3"]}), "at most one chief"),
])
def test_bad_tf_config_is_a_clear_error(text, match):
    with pytest.raises(DistributeError, match=match):
        parse_tf_config(text)


def test_multi_worker_without_tf_config_fails_before_tensorflow(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(DistributeError, match="TF_CONFIG"):
        distribute.make_strategy("multi_worker")


def test_unknown_strategy():
    with pytest.raises(DistributeError, match="--strategy must be one of"):
        distribute.make_strategy("horovod")


def test_tpu_here_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(DistributeError, match="--strategy=tpu: no usable TPU at 'local'"):
        distribute.make_strategy("tpu")


def test_auto_and_one_device_on_this_machine():
    import tensorflow as tf
    strategy = distribute.make_strategy("auto")
    gpus = tf.config.list_logical_devices("GPU")
    expected = tf.distribute.MirroredStrategy if len(gpus) > 1 else tf.distribute.OneDeviceStrategy
    assert isinstance(strategy, expected)
    assert isinstance(distribute.make_strategy("one_device"), tf.distribute.OneDeviceStrategy)
    assert distribute.is_chief(strategy) and distribute.task(strategy) == ("chief", 0)
    info = distribute.describe(strategy)
    assert info["replicas"] == strategy.num_replicas_in_sync and info["workers"] == 1
    # Outside a cluster the collectives are the identity.
    assert distribute.broadcast_from_chief(strategy, b"abc") == b"abc"
    assert distribute.broadcast_json(strategy, {"a": [1, 2]}) == {"a": [1, 2]}
    assert distribute.gather_over_workers(strategy, [1, 2]).tolist() == [[1, 2]]
    assert distribute.task_names(strategy) == ["chief-0"]


def test_replica_divergence_on_one_device_is_zero():
    import tensorflow as tf
    strategy = distribute.make_strategy("one_device")
    with strategy.scope():
        v = tf.Variable([1.0, 2.0])
    assert distribute.replica_divergence(strategy, [v]) == 0.0


def test_role_and_scratch_folder_are_known_without_tensorflow(tmp_path):
    env = {"TF_CONFIG": tf_config({"worker": ["a:1", "b:2"]}, index=1)}
    assert distribute.role("multi_worker", env) == (False, "worker-1")
    assert distribute.role("mirrored", env) == (True, "chief-0")
    with pytest.raises(DistributeError, match="TF_CONFIG"):
        distribute.role("multi_worker", {})
    scratch = distribute.scratch_dir(tmp_path / "run", "worker-1")
    assert scratch.name.startswith("pneumo-train-") and scratch.name.endswith("-worker-1")
    assert tmp_path not in scratch.parents  # never inside (or beside) the user's model_dir
    assert scratch == distribute.scratch_dir(tmp_path / "run" / ".", "worker-1")
    assert scratch != distribute.scratch_dir(tmp_path / "other", "worker-1")


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_cpu_devices_variable_is_checked(value):
    with pytest.raises(DistributeError, match="PNEUMO_CPU_DEVICES must be a positive integer"):
        distribute.configure_cpu_devices({"PNEUMO_CPU_DEVICES": value})
    assert distribute.configure_cpu_devices({}) is None


def test_cpu_devices_after_tensorflow_started_is_a_clear_error():
    import tensorflow as tf
    tf.constant(1.0) + 1.0  # devices initialised (as everywhere in this test process)
    if len(tf.config.list_logical_devices("CPU")) == 3:
        pytest.skip("this process already has 3 logical CPU devices")
    with pytest.raises(DistributeError, match="set the variable before the process starts"):
        distribute.configure_cpu_devices({"PNEUMO_CPU_DEVICES": "3"})


def test_global_batch_is_split_evenly():
    assert distribute.per_replica_batch_size(32, 4) == 8
    assert distribute.per_replica_batch_size(32, 1) == 32
    with pytest.raises(DistributeError, match=r"--batch_size=30 .* 4 replicas \(try 28 or 32\)"):
        distribute.per_replica_batch_size(30, 4)
    with pytest.raises(DistributeError, match=r"\(try 3\)"):
        distribute.per_replica_batch_size(2, 3)


def test_learning_rate_scaling_is_off_by_default():
    assert distribute.scale_learning_rate(1e-3, 8) == 1e-3
    assert distribute.scale_learning_rate(1e-3, 8, "linear") == pytest.approx(8e-3)
    with pytest.raises(DistributeError, match="--lr_scaling must be one of"):
        distribute.scale_learning_rate(1e-3, 8, "sqrt")
    with pytest.raises(DistributeError, match="positive number"):
        distribute.scale_learning_rate(0.0, 8, "linear")


def test_distribution_errors_are_user_errors():
    assert issubclass(DistributeError, UserError)  # one line from the job, no traceback


@pytest.mark.parametrize("leaves,match", [
    (dict(steps_per_execution=0), "--steps_per_execution must be >= 1"),
    (dict(tpu="my-tpu"), "add --strategy=tpu"),
    (dict(data_service="nohost"), "is not HOST:PORT"),
    (dict(data_service="grpc://h:5050", deterministic=True), "--deterministic cannot hold"),
])
def test_distribution_options_are_checked_before_anything_runs(tmp_path, leaves, match):
    from pneumo_data.common.config import with_leaves
    from pneumo_models.train import TrainConfig, train
    with pytest.raises(UserError, match=match):
        train(with_leaves(TrainConfig(), model_dir=str(tmp_path / "run"), **leaves))
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_the_replicas_fails_before_writing(tmp_path, monkeypatch):
    from pneumo_data.common.config import with_leaves
    from pneumo_models import train as train_module

    class FakeStrategy:
        num_replicas_in_sync = 3

    monkeypatch.setattr(distribute, "make_strategy", lambda *a, **k: FakeStrategy())
    with pytest.raises(DistributeError, match=r"--batch_size=32 .* 3 replicas \(try 30 or 33\)"):
        train_module.train(with_leaves(train_module.TrainConfig(),
                                       model_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_multi_worker_config_fails_before_tensorflow_and_writing(tmp_path, monkeypatch):
    from pneumo_data.common.config import with_leaves
    from pneumo_models.train import TrainConfig, train
    monkeypatch.setenv("TF_CONFIG", "{oops")
    with pytest.raises(DistributeError, match="TF_CONFIG is not valid JSON"):
        train(with_leaves(TrainConfig(), model_dir=str(tmp_path / "run"),
                          strategy="multi_worker"))
    assert not (tmp_path / "run").exists()
