"""Cheap global decisions from local ones: majority vote and averaged (log-)probabilities.

The trained coarse model lives in :mod:`ddmpi.coarse.dnn`.

All functions take the gathered local decisions as an array ``probs`` of shape (S, N, K):
S subdomains, N samples, K classes (softmax probabilities of each local CNN).
"""

import numpy as np

EPS = 1e-6


def vote_shares(probs):
    """Majority vote as probabilities, (N, K): each class's share of the local CNNs' votes.

    Ties go to the tied class with the largest summed probability (a tie-break below one vote);
    shares are clipped at EPS and normalised, so that log-likelihoods stay finite.
    """
    probs = np.asarray(probs)
    s, n, k = probs.shape
    votes = np.zeros((n, k))
    np.add.at(votes, (np.arange(n)[None, :].repeat(s, 0), probs.argmax(2)), 1.0)
    shares = (votes + probs.sum(0) / (s + 1.0) * 1e-3) / s
    shares = np.maximum(shares, EPS)
    return shares / shares.sum(1, keepdims=True)


def average_probabilities(probs):
    """Mean of the local probabilities, (N, K)."""
    return probs.mean(0)


def average_log_probabilities(probs):
    """Normalised exp of the mean local log-probability (geometric mean), (N, K)."""
    logits = np.log(np.asarray(probs, dtype=np.float64) + EPS).mean(0)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)
