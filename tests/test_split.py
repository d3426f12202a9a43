import numpy as np
import pytest

from pneumo_data import split


def test_groups_join_patients_and_identical_content_transitively():
    patients = ["a", "a", "b", "c", "d"]
    hashes = ["h1", "h2", "h2", "h3", "h3"]
    # a-a via patient, 1-2 via h2, c-d via h3
    assert split.connected_groups(patients, hashes) == [0, 0, 0, 1, 1]


def test_none_keys_do_not_join():
    assert split.connected_groups([None, None], [None, None]) == [0, 1]


def test_assignment_is_grouped_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    groups, labels = [], []
    for g in range(400):
        label = int(g % 4 == 0)  # 25% positive groups
        for _ in range(rng.integers(1, 4)):
            groups.append(g)
            labels.append(label)
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    a = split.assign_splits(groups, labels, fractions, seed=1)
    assert a == split.assign_splits(groups, labels, fractions, seed=1)
    assert a != split.assign_splits(groups, labels, fractions, seed=2)
    for g in set(groups):
        assert len({a[i] for i in range(len(a)) if groups[i] == g}) == 1
    labels = np.array(labels)
    a = np.array(a)
    for name, fraction in fractions.items():
        for label in (0, 1):
            share = np.mean(a[labels == label] == name)
            assert abs(share - fraction) < 0.03, (name, label, share)


def test_fractions_must_sum_to_one():
    with pytest.raises(ValueError, match="sum to 1"):
        split.assign_splits([0], [0], {"train": 0.5}, seed=0)


def test_leakage_check_names_the_key():
    split.check_no_leakage(["train", "val"], ["a", "b"])
    with pytest.raises(split.LeakageError, match="patient id.*'a' in train and val"):
        split.check_no_leakage(["train", "val"], ["a", "a"], key_names=["patient id"])
