import json

import pytest

from pneumo_models.tf_config import DistributeError, parse_tf_config, role, scratch_dir


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


def test_role_and_scratch_folder_are_known_without_tensorflow(tmp_path):
    env = {"TF_CONFIG": tf_config({"worker": ["a:1", "b:2"]}, index=1)}
    assert role("multi_worker", env) == (False, "worker-1")
    assert role("mirrored", env) == (True, "chief-0")
    with pytest.raises(DistributeError, match="TF_CONFIG"):
        role("multi_worker", {})
    scratch = scratch_dir(tmp_path / "run", "worker-1")
    assert scratch.name.startswith("pneumo-train-") and scratch.name.endswith("-worker-1")
    assert tmp_path not in scratch.parents  # never inside (or beside) the user's model_dir
    assert scratch == scratch_dir(tmp_path / "run" / ".", "worker-1")
    assert scratch != scratch_dir(tmp_path / "other", "worker-1")
