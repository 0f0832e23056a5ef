"""Evaluation statistics: accuracy-type metrics, ROC AUC, and paired tests of two classifiers."""

import math

import numpy as np
from scipy import stats as _scipy_stats

__all__ = [
    "balanced_accuracy",
    "classification_metrics",
    "majority_class_rate",
    "mean_std",
    "paired_bootstrap",
    "roc_auc",
    "sign_flip_test",
]


def _labels(labels, n=None):
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} "
                         f"and dtype {labels.dtype}")
    if n is not None and len(labels) != n:
        raise ValueError(f"expected {n} labels, got {len(labels)}")
    return labels.astype(np.int64)


def _probs(probs, labels):
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, K) with K >= 2, got {probs.shape}")
    labels = _labels(labels, len(probs))
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), "
                         f"got range [{labels.min()}, {labels.max()}]")
    return probs, labels


def _binary_auc(scores, positive):
    """Mann-Whitney AUC of ``scores`` for the boolean ``positive``; NaN without both classes."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _scipy_stats.rankdata(scores)  # average ranks for ties
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc(probs, labels):
    """ROC AUC: of class 1 for K == 2, else macro one-vs-rest over classes with both outcomes.

    NaN when no class has both positive and negative samples.
    """
    probs, labels = _probs(probs, labels)
    if probs.shape[1] == 2:
        return _binary_auc(probs[:, 1], labels == 1)
    aucs = [_binary_auc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def _confusion(pred, labels, num_classes):
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, pred), 1)
    return matrix


def _recalls(matrix):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(matrix) / matrix.sum(1)


def balanced_accuracy(pred, labels, num_classes):
    """Mean recall over the classes present in ``labels`` (NaN for no samples)."""
    labels = _labels(labels)
    pred = _labels(pred, len(labels))
    recalls = _recalls(_confusion(pred, labels, num_classes))
    present = ~np.isnan(recalls)
    return float(recalls[present].mean()) if present.any() else float("nan")


def majority_class_rate(labels):
    """Fraction of the samples that belong to the most frequent class (NaN for no samples)."""
    labels = _labels(labels)
    if labels.size == 0:
        return float("nan")
    return float(np.bincount(labels - labels.min()).max() / labels.size)


def classification_metrics(probs, labels, classes):
    """Accuracy, balanced accuracy, majority rate, ROC AUC, per-class recall, confusion matrix.

    ``classes`` names the K columns of ``probs``; predictions are the arg-max class.
    """
    probs, labels = _probs(probs, labels)
    if len(classes) != probs.shape[1]:
        raise ValueError(f"{len(classes)} class names for {probs.shape[1]} probability columns")
    pred = probs.argmax(1)
    matrix = _confusion(pred, labels, len(classes))
    recalls = _recalls(matrix)
    return {
        "accuracy": float((pred == labels).mean()) if labels.size else float("nan"),
        "balanced_accuracy": balanced_accuracy(pred, labels, len(classes)),
        "majority_class_rate": majority_class_rate(labels),
        "roc_auc": roc_auc(probs, labels),
        "per_class_accuracy": {name: float(r) for name, r in zip(classes, recalls)},
        "confusion_matrix": matrix,
    }


def _paired(correct_a, correct_b):
    """Two boolean arrays (S, N), seeds by test images, from arrays (N,) or (S, N)."""
    a = np.atleast_2d(np.asarray(correct_a, dtype=bool))
    b = np.atleast_2d(np.asarray(correct_b, dtype=bool))
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"paired arrays must have one shape, (N,) or (seeds, N); got "
                         f"{np.shape(correct_a)} and {np.shape(correct_b)}")
    return a, b


def sign_flip_test(correct_a, correct_b):
    """Exact two-sided paired sign-flip (permutation) test over test images.

    ``correct_*``: 'was right' arrays (N,) or (seeds, N). The unit is the image: under the
    null its difference d_i, summed over the seeds, is as likely -d_i as d_i; the p-value is
    P(|sum of +-d_i| >= |sum of d_i|) over all sign flips, exact (a convolution of binomials).
    With one seed this is the exact McNemar test.
    """
    a, b = _paired(correct_a, correct_b)
    d = a.sum(0, dtype=np.int64) - b.sum(0, dtype=np.int64)
    size = np.abs(d)
    pmf = np.ones(1)  # of sum(size_i * B_i), B_i fair coins: index = value
    for m, n in zip(*np.unique(size[size > 0], return_counts=True)):
        term = np.zeros(m * n + 1)
        term[::m] = _scipy_stats.binom.pmf(np.arange(n + 1), n, 0.5)
        pmf = np.convolve(pmf, term)
    flipped = 2 * np.arange(len(pmf)) - size.sum()  # sum of +-size_i for each index
    return min(1.0, float(pmf[np.abs(flipped) >= abs(d.sum())].sum()))


def paired_bootstrap(correct_a, correct_b, n_boot=2000, seed=0, level=0.95):
    """Percentile bootstrap CI of accuracy(a) - accuracy(b), resampling test images.

    ``correct_*``: arrays (N,) or (seeds, N); an image's seeds are resampled together.
    """
    a, b = _paired(correct_a, correct_b)
    if a.size == 0:
        raise ValueError("paired_bootstrap needs at least one sample")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    d = (a.astype(np.float64) - b.astype(np.float64)).mean(0)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // d.size)  # bound the index array's memory
    diffs = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        diffs[start:stop] = d[idx].mean(1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(diffs, [alpha, 1.0 - alpha])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high)}


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; 0.0 for one value) of repeated results."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "n": len(values), "values": values}
