import pytest

from pneumo_data.common.errors import UserError
from pneumo_models import distribute
from pneumo_models.tf_config import DistributeError


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
    assert distribute.task_names(strategy) == ["chief-0"]


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
