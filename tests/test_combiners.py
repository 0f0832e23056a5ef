"""Majority vote and averaged (log-)probabilities (metrics: tests/test_stats.py)."""

import numpy as np

from ddmpi.coarse import combiners


def test_vote_shares_with_ties():
    # 3 subdomains, 2 samples, 3 classes
    probs = np.array([
        [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]],
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]],
        [[0.1, 0.1, 0.8], [0.0, 0.1, 0.9]],
    ])
    # sample 0: votes 0,0,2 -> 0; sample 1: votes 0,1,2 tie -> largest summed prob: class 1 (1.3)
    shares = combiners.vote_shares(probs)
    assert shares.argmax(1).tolist() == [0, 1]
    np.testing.assert_allclose(shares.sum(1), 1.0)
    np.testing.assert_allclose(shares[0, :2], [2 / 3, 0], atol=2e-3)


def test_average_probabilities():
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=(3, 5))
    avg = combiners.average_probabilities(probs)
    assert avg.shape == (5, 4)
    np.testing.assert_allclose(avg.sum(1), 1.0)


def test_average_log_probabilities_is_the_normalised_geometric_mean():
    probs = np.random.default_rng(1).dirichlet(np.ones(4), size=(3, 5))
    geo = np.exp(np.log(probs + combiners.EPS).mean(0))
    np.testing.assert_allclose(combiners.average_log_probabilities(probs),
                               geo / geo.sum(1, keepdims=True), rtol=1e-12)
    # one near-zero vote sinks a class under log averaging but not under plain averaging
    probs = np.array([[[0.9, 0.1]], [[0.9, 0.1]], [[1e-9, 1 - 1e-9]]])
    assert combiners.average_probabilities(probs).argmax(1).tolist() == [0]
    assert combiners.average_log_probabilities(probs).argmax(1).tolist() == [1]
