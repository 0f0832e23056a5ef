"""The one training loop as local CNNs use it (``strategies.local.train_cnn`` -> ``fit``):
learning, best-state keeping, bit-identical stop-and-resume, early stopping."""

import itertools
from dataclasses import asdict

import pytest
from conftest import DIGITS_CNN
from helpers import serial_context

from ddmpi.strategies.local import train_cnn
from ddmpi.training import preemption
from ddmpi.training.checkpoint import load_checkpoint
from ddmpi.training.loop import Diverged, Preempted, evaluate, predict_proba

LOCAL = ["local.model.depth=2", "local.model.width=8", "local.batch_size=64",
         "local.optimizer.lr=0.01"]


def _run(sources, tmp_path, epochs, *, name="c.pt", resume=False, extra=(), progress=None):
    ctx = serial_context(tmp_path, [*LOCAL, f"local.epochs={epochs}", *extra], resume)
    return train_cnn(ctx, DIGITS_CNN, sources[0], sources[1], None, seed=3,
                     path=tmp_path / name, epochs=epochs, progress=progress, name="cnn")


def _strip(history):
    return [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in history]


def test_learns_and_keeps_best_state(digits_sources, tmp_path):
    trainer, step = _run(digits_sources, tmp_path, 4)
    history = trainer.history
    assert len(history) == 4
    assert history[-1].train_loss < history[0].train_loss
    _, val_acc = evaluate(trainer.model, digits_sources[1], step)
    assert val_acc == pytest.approx(max(r.val_accuracy for r in history))
    assert history[trainer.best["epoch"] - 1].val_accuracy == pytest.approx(val_acc)
    assert val_acc > 0.8
    probs = predict_proba(trainer.model, digits_sources[1], step)
    assert probs.shape == (300, 10)
    assert abs(probs.sum(1) - 1).max() < 1e-5


def test_a_diverged_epoch_stops_training_naming_the_model(digits_sources, tmp_path):
    ctx = serial_context(tmp_path, [*LOCAL, "local.epochs=2", "local.optimizer.name=sgd",
                                    "local.optimizer.lr=1e8"])
    with pytest.raises(Diverged, match=r"^cnn: training loss is nan in epoch 1 \(learning rate"):
        train_cnn(ctx, {**DIGITS_CNN, "batchnorm": False}, *digits_sources, None, seed=3,
                  path=tmp_path / "c.pt", epochs=2, name="cnn")
    assert load_checkpoint(tmp_path / "c.pt") is None  # the diverged epoch is not saved


def test_stop_mid_epoch_then_resume_is_identical(digits_sources, tmp_path, monkeypatch):
    ref, _ = _run(digits_sources, tmp_path, 3, name="ref.pt")

    # 19 batches per epoch, polled after each batch and once at the epoch's end:
    # call 28 is after batch 8 of epoch 2
    calls = itertools.count(1)
    with monkeypatch.context() as patch:
        patch.setattr(preemption, "requested", lambda: next(calls) == 28)
        with pytest.raises(Preempted):
            _run(digits_sources, tmp_path, 3, name="b.pt")
    state = load_checkpoint(tmp_path / "b.pt")
    assert (state["epoch"], state["batch"], state["finished"]) == (1, 8, False)

    trainer, _ = _run(digits_sources, tmp_path, 3, name="b.pt", resume=True)
    assert trainer.best["epoch"] == ref.best["epoch"]
    assert _strip(trainer.history) == _strip(ref.history)
    for (name, a), b in zip(ref.model.state_dict().items(), trainer.model.state_dict().values()):
        assert a.equal(b), name


class _Progress:
    def __init__(self):
        self.resumed, self.epochs = [], []

    def epochs_resumed(self, count):
        self.resumed.append(count)

    def epoch_done(self, name, record):
        self.epochs.append(record.epoch)


def test_resume_of_finished_run_trains_nothing(digits_sources, tmp_path):
    first, _ = _run(digits_sources, tmp_path, 2)
    progress = _Progress()
    again, _ = _run(digits_sources, tmp_path, 2, resume=True, progress=progress)
    assert progress.epochs == [] and progress.resumed == [2]
    assert _strip(again.history) == _strip(first.history)


def test_early_stopping(digits_sources, tmp_path):
    # a large rate on purpose: noisy, so validation accuracy stalls early
    trainer, _ = _run(digits_sources, tmp_path, 30,
                      extra=["local.early_stopping_patience=1", "local.optimizer.lr=0.2"])
    assert len(trainer.history) < 30
    assert len(trainer.history) - trainer.best["epoch"] == 2
