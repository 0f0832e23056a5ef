"""Seeded, stratified train/val/test splits; grouped splits keep each group on one side."""

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
from sklearn.model_selection import train_test_split

from data_prep.errors import PrepError

log = logging.getLogger(__name__)

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class SplitOptions:
    """How to split: fractions of the samples for val and test, seed, optional sample limit.

    ``test_fraction=None`` means: keep a source's official test split, or use
    ``DEFAULT_TEST_FRACTION`` for sources without one. ``limit`` caps the samples taken from each
    official split (or from the whole source when it has none), chosen stratified and seeded.
    """

    val_fraction: float = DEFAULT_VAL_FRACTION
    test_fraction: Optional[float] = None
    seed: int = 0
    limit: Optional[int] = None

    def __post_init__(self):
        test = self.test_fraction or 0.0
        if not (0 <= self.val_fraction < 1 and 0 <= test < 1 and self.val_fraction + test < 1):
            raise PrepError(f"val fraction {self.val_fraction} and test fraction {test} must be in "
                            f"[0, 1) with a sum below 1")
        if self.limit is not None and self.limit < 1:
            raise PrepError(f"limit must be a positive number of samples, got {self.limit}")


def split_sources(pools, options, fresh_split=False):
    """Split a source that ships its own splits: ``pools`` maps ``train``/``test`` to labels.

    Each pool is first cut to ``options.limit`` samples. With both pools, the official test
    split is kept and ``val`` is carved from ``train``; with ``fresh_split`` or a single pool,
    the pooled samples are split anew. Returns ``(keep, parts)``: the kept indices of each pool,
    and the splits as indices into the kept samples of the pools concatenated in order.
    """
    official = len(pools) == 2 and not fresh_split
    if official and options.test_fraction is not None:
        raise PrepError("the source has an official test split, which is kept; a test fraction "
                        "applies only with a fresh split (--fresh-split)")
    keep = {name: subsample(labels, options.limit, options.seed) for name, labels in pools.items()}
    labels = np.concatenate([pools[name][idx] for name, idx in keep.items()])
    if not official:
        test = DEFAULT_TEST_FRACTION if options.test_fraction is None else options.test_fraction
        return keep, split(labels, options.val_fraction, test, options.seed)
    n_train = len(keep["train"])
    parts = split(labels[:n_train], options.val_fraction, 0.0, options.seed)
    return keep, {**parts, "test": n_train + np.arange(len(keep["test"]))}


def subsample(labels, limit, seed):
    """Sorted indices of at most ``limit`` of the samples, stratified by label when possible."""
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    stratify = labels if _can_stratify(labels, limit, n - limit) else None
    taken, _ = train_test_split(np.arange(n), train_size=limit, random_state=seed,
                                stratify=stratify)
    return np.sort(taken)


def split(labels, val_fraction, test_fraction, seed, groups=None):
    """``{"train", "val", "test"}`` -> sorted sample indices; a zero fraction leaves its split out.

    Stratified by label; with ``groups`` every group lands in exactly one split (checked).
    """
    labels = np.asarray(labels)
    rest = np.arange(len(labels))
    parts = {}
    for name, fraction in (("test", test_fraction), ("val", val_fraction / (1 - test_fraction))):
        if fraction > 0:
            taken = _take(labels[rest], None if groups is None else groups[rest], fraction, seed)
            parts[name] = rest[taken]
            rest = rest[~taken]
    parts = {"train": rest, **{k: parts[k] for k in ("val", "test") if k in parts}}
    if groups is not None:
        check_disjoint_groups(parts, groups)
        log.info("grouped split: %s", ", ".join(
            f"{k} {len(v)} samples / {len(np.unique(groups[v]))} groups" for k, v in parts.items()))
    return parts


def check_disjoint_groups(parts, groups):
    """Raise :class:`PrepError` if a group has samples in two splits."""
    seen = {}
    for name, idx in parts.items():
        for group in np.unique(np.asarray(groups)[idx]).tolist():
            if seen.setdefault(group, name) != name:
                raise PrepError(f"group {group!r} has samples in both {seen[group]!r} and {name!r}")


def _take(labels, groups, fraction, seed):
    """Boolean mask of about ``fraction`` of the samples (whole groups when ``groups`` is given)."""
    if groups is not None:
        return _take_groups(labels, groups, fraction, seed)
    n = len(labels)
    count = max(1, round(fraction * n))
    if count >= n:
        raise PrepError(f"{n} samples are too few to split off a fraction {fraction:.3g}")
    stratify = labels if _can_stratify(labels, count, n - count) else None
    _, taken = train_test_split(np.arange(n), test_size=count, random_state=seed,
                                stratify=stratify)
    mask = np.zeros(n, dtype=bool)
    mask[taken] = True
    return mask


def _take_groups(labels, groups, fraction, seed):
    """Mask of whole groups holding about ``fraction`` of the samples of every class.

    Greedy: visit the groups in seeded random order and take a group whenever that brings the
    per-class counts taken closer (L1) to ``fraction`` of the class totals.
    """
    names, group_of = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        raise PrepError(f"{len(names)} group(s) are too few to split off a fraction "
                        f"{fraction:.3g} by group")
    _, class_of = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(names), class_of.max() + 1))
    np.add.at(counts, (group_of, class_of), 1)
    target = fraction * counts.sum(axis=0)
    taken_counts = np.zeros_like(target)
    chosen = np.zeros(len(names), dtype=bool)
    for g in np.random.default_rng(seed).permutation(len(names)):
        candidate = taken_counts + counts[g]
        if np.abs(candidate - target).sum() < np.abs(taken_counts - target).sum():
            chosen[g], taken_counts = True, candidate
    if chosen.all() or not chosen.any():
        raise PrepError(f"cannot split off a fraction {fraction:.3g} of {len(names)} groups "
                        f"with both sides non-empty")
    return chosen[group_of]


def _can_stratify(labels, n_a, n_b):
    """Whether both sides of an ``n_a``/``n_b`` split can hold every class (sklearn's rule)."""
    counts = np.unique(labels, return_counts=True)[1]
    return counts.min() >= 2 and min(n_a, n_b) >= len(counts)
