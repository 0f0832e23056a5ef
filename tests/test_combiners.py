"""Majority vote, averaged probabilities, coarse DNN inputs and training."""

import numpy as np

from ddmpi.coarse import combiners
from ddmpi.config import CoarseConfig


def test_majority_vote_with_ties():
    # 3 subdomains, 2 samples, 3 classes
    probs = np.array([
        [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]],
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]],
        [[0.1, 0.1, 0.8], [0.0, 0.1, 0.9]],
    ])
    # sample 0: votes 0,0,2 -> 0; sample 1: votes 0,1,2 tie -> largest summed prob: class 1 (1.3)
    assert combiners.majority_vote(probs).tolist() == [0, 1]


def test_average_probabilities():
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=(3, 5))
    avg = combiners.average_probabilities(probs)
    assert avg.shape == (5, 4)
    np.testing.assert_allclose(avg.sum(1), 1.0)


def test_coarse_features_layout():
    probs = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 100
    x = combiners.coarse_features(probs, inputs="prob")
    assert x.shape == (3, 8)
    np.testing.assert_array_equal(x[1], np.concatenate([probs[0, 1], probs[1, 1]]))


def test_confusion_and_per_class():
    matrix = combiners.confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    np.testing.assert_allclose(combiners.per_class_accuracy(matrix), [1, 1, 0.5])


def test_coarse_dnn_learns_which_subdomain_to_trust():
    """Subdomain 0 is always right, subdomain 1 is confidently wrong: averaging fails, the
    coarse DNN learns to follow subdomain 0."""
    rng = np.random.default_rng(0)
    n, k = 600, 3
    labels = rng.integers(0, k, n)
    right = np.eye(k)[labels] * 0.55 + 0.15
    wrong = np.eye(k)[(labels + 1) % k] * 0.85 + 0.05
    probs = np.stack([right, wrong]).astype(np.float32)
    model, history = combiners.train_coarse(probs[:, :400], labels[:400],
                                            CoarseConfig(epochs=60, hidden=[16]), seed=0)
    pred = combiners.coarse_predict(model, probs[:, 400:]).argmax(1)
    assert combiners.accuracy(pred, labels[400:]) == 1.0
    assert combiners.accuracy(combiners.average_probabilities(probs).argmax(1), labels) < 0.1
    assert history[-1]["train_loss"] < history[0]["train_loss"]
