"""Evaluation statistics against scikit-learn, scipy-free formulas and hand-made cases."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from ddmpi.report.stats import (
    balanced_accuracy,
    classification_metrics,
    majority_class_rate,
    mcnemar,
    mean_std,
    paired_bootstrap,
    roc_auc,
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


@pytest.mark.parametrize("b, c", [(10, 2), (3, 3), (0, 7), (25, 14)])
def test_mcnemar_exact_p_value(b, c):
    both, neither = 40, 9
    a = np.array([True] * b + [False] * c + [True] * both + [False] * neither)
    other = np.array([False] * b + [True] * c + [True] * both + [False] * neither)
    perm = np.random.default_rng(b).permutation(len(a))
    result = mcnemar(a[perm], other[perm])
    assert (result["b"], result["c"]) == (b, c)
    assert result["p_value"] == pytest.approx(_exact_two_sided(b, c))


def test_mcnemar_no_discordant_pairs():
    same = np.array([True, False, True])
    assert mcnemar(same, same) == {"b": 0, "c": 0, "p_value": 1.0}
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


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
