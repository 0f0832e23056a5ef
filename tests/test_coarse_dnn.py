"""Coarse model: skip path from averaged log-probabilities, holdout, early stopping, fallback."""

import inspect

import numpy as np
import pytest
import torch

from ddmpi.coarse import combiners, dnn
from ddmpi.config import CoarseConfig


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def informative_one(n, seed, k=5, s=4):
    """Subdomain 0 is mildly confident and right; the others are confident noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(0, 3.0, (s, n, k))
    z[0] = rng.normal(0, 0.5, (n, k))
    z[0, np.arange(n), y] += 1.5
    return _softmax(z), y


def few_shot(per_class, seed, k=40, s=4):
    """Every subdomain is usually right: averaging is near perfect, data per class is tiny."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(k), per_class))
    z = rng.normal(0, 1.0, (s, len(y), k))
    z[:, np.arange(len(y)), y] += rng.normal(2.5, 1.0, (s, len(y)))
    return _softmax(z), y


def _acc(p, y):
    return float((np.asarray(p).argmax(1) == np.asarray(y)).mean())


@pytest.mark.parametrize("inputs", ["log", "prob"])
def test_untrained_skip_model_is_averaged_log_probabilities(inputs):
    probs, _ = few_shot(3, seed=1, k=7)
    torch.manual_seed(0)
    model = dnn.CoarseNet(4, 7, hidden=[16, 8], dropout=0.2, inputs=inputs, skip=True)
    pred = dnn.predict_coarse(model, probs)
    ref = combiners.average_log_probabilities(probs)
    np.testing.assert_allclose(pred, ref, atol=1e-6)
    assert (pred.argmax(1) == ref.argmax(1)).all()


def test_without_skip_it_is_a_plain_mlp():
    probs, _ = few_shot(3, seed=1, k=7)
    torch.manual_seed(0)
    model = dnn.CoarseNet(4, 7, hidden=[16], skip=False)
    assert model.skip_weight is None and model.mlp[-1].weight.abs().sum() > 0
    assert not np.allclose(dnn.predict_coarse(model, probs),
                           combiners.average_log_probabilities(probs), atol=1e-3)


def test_features_layout_and_rebuild_from_config():
    probs = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 100 + 0.01
    x = dnn.features(probs, "prob")
    assert x.dtype == torch.float32 and x.shape == (3, 8)
    np.testing.assert_array_equal(x[1].numpy(), np.concatenate([probs[0, 1], probs[1, 1]]))
    np.testing.assert_allclose(dnn.features(probs, "log").numpy(), np.log(x.numpy() + 1e-6),
                               rtol=1e-6)
    torch.manual_seed(0)
    model = dnn.CoarseNet(2, 4, hidden=[5], inputs="prob", skip=True)
    torch.nn.init.normal_(model.mlp[-1].weight)
    clone = dnn.build_coarse(model.config)
    clone.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(dnn.predict_coarse(clone, probs),
                                  dnn.predict_coarse(model, probs))


def test_coarse_model_earns_its_place_when_one_subdomain_is_informative():
    probs, y = informative_one(400, seed=0)
    test_probs, test_y = informative_one(1000, seed=100)
    cfg = CoarseConfig(hidden=[32], epochs=80, patience=20)
    fit = dnn.train_coarse(probs, y, cfg, seed=0)
    dnn_acc = _acc(dnn.predict_coarse(fit.model, test_probs), test_y)
    avg_acc = _acc(combiners.average_probabilities(test_probs), test_y)
    assert avg_acc < 0.5 and dnn_acc > avg_acc + 0.3
    assert fit.chosen == "cnn_dnn" and fit.best_epoch > 0
    assert fit.holdout["cnn_dnn"]["accuracy"] > fit.holdout["average_probabilities"]["accuracy"]
    assert fit.history[fit.best_epoch]["holdout_loss"] < fit.history[0]["holdout_loss"]


@pytest.mark.parametrize("skip", [True, False])
def test_few_samples_per_class_never_worse_than_averaging(skip):
    probs, y = few_shot(2, seed=0)             # 40 classes x 2 decisions
    test_probs, test_y = few_shot(25, seed=100)
    fit = dnn.train_coarse(probs, y, CoarseConfig(skip=skip), seed=0)
    avg_acc = _acc(combiners.average_probabilities(test_probs), test_y)
    assert avg_acc > 0.9
    assert _acc(dnn.combine(fit.chosen, fit.model, test_probs), test_y) >= avg_acc - 0.005
    if not skip:                               # a plain MLP cannot learn 40 classes from 64
        assert fit.chosen != "cnn_dnn"


def test_early_stopping_keeps_the_best_holdout_state():
    probs, y = informative_one(300, seed=3)
    cfg = CoarseConfig(hidden=[16], epochs=400, patience=5, lr=3e-2)
    fit = dnn.train_coarse(probs, y, cfg, seed=0)
    epochs = [h["epoch"] for h in fit.history]
    assert epochs == list(range(len(epochs))) and epochs[-1] == fit.best_epoch + 5 < 400
    losses = [h["holdout_loss"] for h in fit.history]
    assert fit.best_epoch == int(np.argmin(losses))
    hold = np.asarray(fit.holdout["indices"])
    p = dnn.predict_coarse(fit.model, probs[:, hold])
    nll = -np.log(p[np.arange(len(hold)), y[hold]]).mean()
    assert nll == pytest.approx(losses[fit.best_epoch], rel=1e-4)
    assert not fit.model.training


@pytest.mark.parametrize("counts, fraction", [([2] * 40, 0.2), ([20] * 5, 0.2), ([50, 3, 1], 0.3),
                                              ([1, 1, 1], 0.1), ([1, 1], 0.9), ([7], 0.01)])
def test_holdout_is_stratified_and_never_empty(counts, fraction):
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts))
    hold = dnn.stratified_holdout(labels, fraction, seed=4)
    assert 0 < len(hold) < len(labels) and len(set(hold.tolist())) == len(hold)
    held = np.bincount(labels[hold], minlength=len(counts))
    target = max(1, round(fraction * len(labels)))
    if min(counts) > 1:
        assert len(hold) == target and (held < np.array(counts)).all()
    assert (np.abs(held - fraction * np.array(counts)) < 1 + 1e-9).all()
    if counts == [20] * 5:
        assert held.tolist() == [4] * 5
    np.testing.assert_array_equal(hold, dnn.stratified_holdout(labels, fraction, seed=4))


def test_deterministic_for_a_seed():
    probs, y = informative_one(200, seed=5)
    cfg = CoarseConfig(hidden=[16], epochs=15, dropout=0.3)
    fits = [dnn.train_coarse(probs, y, cfg, seed=s) for s in (7, 7, 8)]
    assert fits[0].history == fits[1].history and fits[0].holdout == fits[1].holdout
    for a, b in zip(fits[0].model.state_dict().values(), fits[1].model.state_dict().values()):
        assert torch.equal(a, b)
    assert fits[0].holdout["indices"] != fits[2].holdout["indices"]


def test_training_api_takes_no_test_data():
    params = list(inspect.signature(dnn.train_coarse).parameters)
    assert params == ["probs", "labels", "cfg", "seed", "device", "honest"]
    probs, y = informative_one(50, seed=6)
    fit = dnn.train_coarse(probs, y, CoarseConfig(hidden=[4], epochs=2), seed=0)
    assert set(fit.holdout["indices"]) <= set(range(50))
    assert set(fit.holdout) == {"indices", "fallback_test", "honest", *dnn.COMBINERS}


def test_holdout_is_drawn_from_the_honest_decisions():
    probs, y = informative_one(300, seed=9)
    honest = np.arange(300) >= 240          # e.g. train+val: only val is honest
    fit = dnn.train_coarse(probs, y, CoarseConfig(hidden=[4], epochs=3), seed=0, honest=honest)
    hold = np.asarray(fit.holdout["indices"])
    assert (hold >= 240).all() and len(hold) == 12 and fit.holdout["honest"]


@pytest.mark.parametrize("honest", [None, np.arange(50) == 49])
def test_holdout_is_drawn_from_all_without_two_honest_decisions(honest):
    probs, y = informative_one(50, seed=6)
    fit = dnn.train_coarse(probs, y, CoarseConfig(hidden=[4], epochs=2), seed=0, honest=honest)
    assert len(fit.holdout["indices"]) == 10 and not fit.holdout["honest"]


@pytest.mark.parametrize("train_on, honest_part", [("train+val", [0, 0, 0, 1, 1]),
                                                   ("crossfit", [1, 1, 1, 1, 1]),
                                                   ("val", [1, 1]), ("train", [0, 0, 0])])
def test_coarse_training_data_marks_decisions_the_local_cnns_did_not_train_on(train_on,
                                                                              honest_part):
    from ddmpi.strategies.cnn_dnn import coarse_training_data
    labels = {"train": np.array([0, 1, 2]), "val": np.array([3, 4])}
    gathered = {split: np.full((2, len(labels["val" if split == "val" else "train"]), 5),
                               i, np.float32) for i, split in enumerate(("train", "oof", "val"))}
    x, y, honest = coarse_training_data(train_on, gathered, labels)
    assert honest.tolist() == [bool(h) for h in honest_part] and len(y) == x.shape[1]
    source = {"crossfit": "oof"}.get(train_on, train_on.split("+")[0])
    assert x[0, 0, 0] == ("train", "oof", "val").index(source)


def _scores(dnn_right, avg_right, vote_right):
    out = {}
    for name, right in (("cnn_dnn", dnn_right), ("average_probabilities", avg_right),
                        ("majority_vote", vote_right)):
        right = np.asarray(right, bool)
        out[name] = {"accuracy": float(right.mean()), "nll": 0.0, "right": right}
    return out


def test_fallback_needs_significant_evidence():
    n = 100
    base = np.ones(n, bool)
    worse = base.copy()
    worse[:12] = False                       # the coarse model misses 12 the others get
    assert dnn._choose(_scores(base, worse, worse), True)[0] == "cnn_dnn"
    choice, test = dnn._choose(_scores(worse, base, worse), True)
    assert choice == "average_probabilities"  # 12 vs 0 discordant: p = 0.5 ** 12
    assert test["cheap_only_right"] == 12 and test["p_value"] == pytest.approx(0.5 ** 12)
    assert dnn._choose(_scores(worse, base, worse), False)[0] == "cnn_dnn"
    slightly = base.copy()
    slightly[:2] = False                     # 2 vs 0: not significant, the coarse model stays
    assert dnn._choose(_scores(slightly, base, base), True)[0] == "cnn_dnn"
    choice, _ = dnn._choose(_scores(worse, worse, base), True)
    assert choice == "majority_vote"          # the better cheap combiner is tested
    tie = dnn._choose(_scores(worse, base, base), True)
    assert tie[0] == "average_probabilities"  # equal cheap accuracies: averaging


def test_log_probability_combiner_is_reported_never_chosen():
    """The coarse model's untrained start is scored on the holdout and combinable (so a run
    shows what training the coarse model adds) but not a fallback: an untrained coarse model
    equals it, and a trained one that loses to it keeps its own row."""
    probs, y = informative_one(200, seed=3)
    fit = dnn.train_coarse(probs, y, CoarseConfig(hidden=[4], epochs=0), seed=0)
    held = fit.holdout
    assert held["average_log_probabilities"]["accuracy"] == held["cnn_dnn"]["accuracy"]
    assert held["average_log_probabilities"]["nll"] == pytest.approx(held["cnn_dnn"]["nll"])
    np.testing.assert_allclose(dnn.combine("average_log_probabilities", fit.model, probs),
                               dnn.combine("cnn_dnn", fit.model, probs), atol=1e-6)
    scores = _scores(np.zeros(50), np.zeros(50), np.zeros(50))
    scores["average_log_probabilities"] = {"accuracy": 1.0, "nll": 0.0, "right": np.ones(50, bool)}
    assert dnn._choose(scores, True)[0] == "cnn_dnn"
