"""Splits: seeded, stratified, exact partitions; grouped splits never share a group."""

import numpy as np
import pytest

from data_prep.errors import PrepError
from data_prep.splits import SplitOptions, check_disjoint_groups, split, subsample


def assert_partition(parts, n):
    joined = np.concatenate(list(parts.values()))
    assert sorted(joined.tolist()) == list(range(n))


def test_stratified_split_is_seeded_and_exact():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    parts = split(labels, 0.1, 0.2, seed=7)
    assert_partition(parts, 200)
    assert {k: len(v) for k, v in parts.items()} == {"train": 140, "val": 20, "test": 40}
    np.testing.assert_array_equal(np.bincount(labels[parts["test"]]), [20, 10, 6, 4])
    again = split(labels, 0.1, 0.2, seed=7)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    assert not np.array_equal(split(labels, 0.1, 0.2, seed=8)["test"], parts["test"])


def test_zero_fractions_leave_splits_out_and_tiny_sets_still_split():
    labels = np.arange(30) % 3
    assert list(split(labels, 0.0, 0.3, seed=0)) == ["train", "test"]
    assert list(split(labels, 0.0, 0.0, seed=0)) == ["train"]
    parts = split(np.array([0, 0, 0, 1]), 0.2, 0.2, seed=0)  # too few to stratify
    assert_partition(parts, 4) and all(len(v) for v in parts.values())


@pytest.mark.parametrize("seed", range(8))
def test_grouped_split_never_shares_a_group(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, size=150)
    groups = np.repeat([f"patient{i}" for i in range(150)], sizes)
    labels = np.repeat(rng.random(150) < 0.35, sizes).astype(int)  # one label per patient
    parts = split(labels, 0.1, 0.2, seed=seed, groups=groups)
    assert_partition(parts, len(labels))
    sides = [set(groups[idx]) for idx in parts.values()]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    n = len(labels)
    assert abs(len(parts["test"]) / n - 0.2) < 0.03 and abs(len(parts["val"]) / n - 0.1) < 0.03
    for idx in parts.values():  # stratified: the class ratio holds in every split
        assert abs(labels[idx].mean() - labels.mean()) < 0.08


def test_check_disjoint_groups_catches_a_shared_group():
    groups = np.array(["a", "a", "b", "c"])
    check_disjoint_groups({"train": np.array([0, 1, 2]), "test": np.array([3])}, groups)
    with pytest.raises(PrepError, match="group 'a' has samples in both 'train' and 'test'"):
        check_disjoint_groups({"train": np.array([0, 2]), "test": np.array([1, 3])}, groups)


def test_too_few_groups_or_samples():
    with pytest.raises(PrepError, match="1 group"):
        split(np.array([0, 1, 0]), 0.1, 0.2, seed=0, groups=np.array(["p", "p", "p"]))
    with pytest.raises(PrepError, match="too few"):
        split(np.array([0]), 0.0, 0.5, seed=0)


def test_subsample_is_stratified_and_seeded():
    labels = np.repeat([0, 1], [900, 100])
    keep = subsample(labels, 100, seed=1)
    assert len(keep) == 100 and np.bincount(labels[keep]).tolist() == [90, 10]
    assert np.array_equal(keep, np.sort(keep)) and np.array_equal(keep, subsample(labels, 100, 1))
    assert len(subsample(labels, 5000, 0)) == 1000


@pytest.mark.parametrize("kwargs", [{"val_fraction": 0.6, "test_fraction": 0.5},
                                    {"val_fraction": -0.1}, {"limit": 0}])
def test_split_options_are_validated(kwargs):
    with pytest.raises(PrepError):
        SplitOptions(**kwargs)
