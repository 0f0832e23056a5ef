"""Evaluation statistics against scikit-learn, scipy-free formulas and hand-made cases."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from ddmpi.report.stats import (
    balanced_accuracy,
    classification_metrics,
    majority_class_rate,
    mean_std,
    paired_bootstrap,
    roc_auc,
    sign_flip_test,
)


def _tied_probs(rng, n, k):
    """Class probabilities rounded to one decimal, so many scores tie."""
    raw = rng.random((n, k)) + 0.05
    return np.round(raw / raw.sum(1, keepdims=True), 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    probs = _tied_probs(rng, 200, 2)
    labels = rng.integers(0, 2, 200)
    assert len(np.unique(probs[:, 1])) < 20  # ties really occur
    assert roc_auc(probs, labels) == pytest.approx(skm.roc_auc_score(labels, probs[:, 1]))


def test_binary_auc_perfect_reversed_and_single_class():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    assert roc_auc(probs, np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(probs, np.array([1, 1, 0, 0])) == 0.0
    assert roc_auc(probs, np.array([0, 1, 0, 1])) == 0.75
    assert math.isnan(roc_auc(probs, np.zeros(4, dtype=int)))


@pytest.mark.parametrize("seed", [0, 3])
def test_multiclass_auc_matches_sklearn_ovr_macro(seed):
    rng = np.random.default_rng(seed)
    raw = rng.random((300, 4))
    probs = raw / raw.sum(1, keepdims=True)
    labels = rng.integers(0, 4, 300)
    expected = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert roc_auc(probs, labels) == pytest.approx(expected)
    tied = _tied_probs(rng, 300, 4)
    per_class = [skm.roc_auc_score(labels == k, tied[:, k]) for k in range(4)]
    assert roc_auc(tied, labels) == pytest.approx(np.mean(per_class))


def test_multiclass_auc_skips_classes_without_positives():
    rng = np.random.default_rng(5)
    probs = _tied_probs(rng, 120, 5)
    labels = rng.choice([0, 2, 4], 120)  # classes 1 and 3 absent
    expected = np.mean([skm.roc_auc_score(labels == k, probs[:, k]) for k in (0, 2, 4)])
    assert roc_auc(probs, labels) == pytest.approx(expected)
    assert math.isnan(roc_auc(probs, np.full(120, 2)))


def test_roc_auc_rejects_bad_shapes():
    with pytest.raises(ValueError):
        roc_auc(np.ones((3, 1)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError):
        roc_auc(np.ones((3, 2)), np.array([0, 1, 2]))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_and_majority_rate():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 3], 150, p=[0.6, 0.3, 0.1])
    pred = rng.integers(0, 4, 150)
    assert balanced_accuracy(pred, labels, 4) == pytest.approx(
        skm.balanced_accuracy_score(labels, pred))
    assert majority_class_rate(labels) == pytest.approx(np.mean(labels == 0))
    assert majority_class_rate([2, 2, 1, 0]) == 0.5


def test_classification_metrics():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1],
                      [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 1, 0, 0])  # class "c" absent; predictions 0, 1, 0, 2, 0
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["majority_class_rate"] == pytest.approx(3 / 5)
    assert m["roc_auc"] == pytest.approx(np.mean(
        [skm.roc_auc_score(labels == k, probs[:, k]) for k in (0, 1)]))
    assert m["per_class_accuracy"]["a"] == pytest.approx(2 / 3)
    assert m["per_class_accuracy"]["b"] == pytest.approx(1 / 2)
    assert math.isnan(m["per_class_accuracy"]["c"])
    np.testing.assert_array_equal(m["confusion_matrix"],
                                  [[2, 0, 1], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(m["confusion_matrix"],
                                  skm.confusion_matrix(labels, probs.argmax(1), labels=[0, 1, 2]))
    with pytest.raises(ValueError):
        classification_metrics(probs, labels, ["a", "b"])


def _exact_two_sided(b, c):
    """Exact McNemar p-value from binomial coefficients (p = 1/2, symmetric)."""
    n, k = b + c, min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("b, c", [(10, 2), (3, 3), (0, 7), (25, 14), (0, 0)])
def test_sign_flip_test_with_one_seed_is_mcnemar(b, c):
    """One seed: the exact McNemar test; arrays of two lengths are refused."""
    a = np.array([True] * b + [False] * c + [True] * 30 + [False] * 5)
    other = np.array([False] * b + [True] * c + [True] * 30 + [False] * 5)
    assert sign_flip_test(a, other) == pytest.approx(_exact_two_sided(b, c))
    assert sign_flip_test(a[None], other[None]) == pytest.approx(_exact_two_sided(b, c))
    with pytest.raises(ValueError, match="one shape"):
        sign_flip_test([True], [True, False])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_flip_test_is_exact_over_all_flips(seed):
    """Against enumerating the 2^N sign flips of the per-image differences (3 seeds, N = 12)."""
    rng = np.random.default_rng(seed)
    a, b = rng.random((3, 12)) < 0.7, rng.random((3, 12)) < 0.5
    d = a.sum(0).astype(int) - b.sum(0).astype(int)
    signs = np.array(np.meshgrid(*[[-1, 1]] * 12)).reshape(12, -1).T
    expected = np.mean(np.abs(signs @ d) >= abs(d.sum()))
    assert sign_flip_test(a, b) == pytest.approx(expected)


def test_repeated_seeds_add_no_evidence():
    """S copies of one seed's predictions give that seed's p-value and interval: the image is
    the unit. Pooling them as S x N independent pairs would shrink both."""
    rng = np.random.default_rng(5)
    a, b = rng.random(400) < 0.8, rng.random(400) < 0.72
    once = (sign_flip_test(a, b), paired_bootstrap(a, b, n_boot=1000))
    thrice = np.stack([a] * 3), np.stack([b] * 3)
    assert sign_flip_test(*thrice) == pytest.approx(once[0])
    assert paired_bootstrap(*thrice, n_boot=1000) == pytest.approx(once[1])
    pooled = np.concatenate([a] * 3), np.concatenate([b] * 3)
    assert sign_flip_test(*pooled) < once[0] / 5  # McNemar of the pooled pairs
    assert once[0] < 0.05


def test_paired_bootstrap_resamples_images_with_their_seeds():
    """Two seeds that disagree on every image cancel per image: the difference is 0 on each
    image, so every resample of images gives 0 (resampling the S x N pairs would not)."""
    a = np.array([[True] * 50, [False] * 50])
    assert paired_bootstrap(a, a[::-1], n_boot=200) == {"diff": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap(np.ones((2, 5), bool), np.ones((3, 5), bool))


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    a = rng.random(2000) < 0.80
    b = rng.random(2000) < 0.75
    result = paired_bootstrap(a, b, n_boot=2000, seed=0)
    diff = a.mean() - b.mean()
    assert result["diff"] == pytest.approx(diff)
    assert result["low"] < diff < result["high"]
    # Width close to the normal approximation 2 * 1.96 * sd(d) / sqrt(N).
    d = a.astype(float) - b.astype(float)
    normal_width = 2 * 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert result["high"] - result["low"] == pytest.approx(normal_width, rel=0.15)
    assert paired_bootstrap(a, b, n_boot=2000, seed=0) == result
    assert paired_bootstrap(a, a) == {"diff": 0.0, "low": 0.0, "high": 0.0}


def test_paired_bootstrap_level_widens_interval():
    rng = np.random.default_rng(2)
    a, b = rng.random(300) < 0.7, rng.random(300) < 0.6
    narrow = paired_bootstrap(a, b, n_boot=1000, level=0.5)
    wide = paired_bootstrap(a, b, n_boot=1000, level=0.99)
    assert wide["low"] < narrow["low"] < narrow["high"] < wide["high"]


def test_mean_std():
    result = mean_std([0.9, 0.8, 0.85])
    assert result["mean"] == pytest.approx(0.85)
    assert result["std"] == pytest.approx(0.05)
    assert result["n"] == 3 and result["values"] == [0.9, 0.8, 0.85]
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1, "values": [0.5]}
    with pytest.raises(ValueError):
        mean_std([])
