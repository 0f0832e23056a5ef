"""The local training loop: learning, best-state keeping, bit-identical stop-and-resume."""

import itertools
from dataclasses import asdict

import pytest
import torch
from conftest import DIGITS_CNN

from ddmpi.config import LocalConfig, ModelConfig
from ddmpi.training.loop import Preempted, evaluate, predict_proba, train_local


def _cfg(**kw):
    cfg = LocalConfig(model=ModelConfig(depth=2, width=8), batch_size=64, **kw)
    cfg.optimizer.lr = 0.01
    return cfg


def _run(sources, cfg, **kw):
    return train_local(DIGITS_CNN, sources[0], sources[1], cfg, device=torch.device("cpu"), seed=3,
                       **kw)


def test_learns_and_keeps_best_state(digits_sources):
    model, history, best_epoch = _run(digits_sources, _cfg(epochs=4))
    assert len(history) == 4
    assert history[-1].train_loss < history[0].train_loss
    _, val_acc = evaluate(model, digits_sources[1], torch.device("cpu"))
    assert val_acc == pytest.approx(max(r.val_accuracy for r in history))
    assert history[best_epoch - 1].val_accuracy == pytest.approx(val_acc)
    assert val_acc > 0.8
    probs = predict_proba(model, digits_sources[1], torch.device("cpu"))
    assert probs.shape == (300, 10)
    assert abs(probs.sum(1) - 1).max() < 1e-5


def test_stop_mid_epoch_then_resume_is_identical(digits_sources, tmp_path):
    cfg = _cfg(epochs=3)
    ref_model, ref_history, ref_best = _run(digits_sources, cfg,
                                            checkpoint_path=tmp_path / "ref.pt")

    calls = itertools.count(1)
    with pytest.raises(Preempted):  # stop in epoch 2, batch 9 (19 batches per epoch)
        _run(digits_sources, cfg, checkpoint_path=tmp_path / "b.pt",
             should_stop=lambda: next(calls) == 28)
    model, history, best = _run(digits_sources, cfg, checkpoint_path=tmp_path / "b.pt", resume=True)

    assert best == ref_best
    strip = [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in history]
    assert strip == [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in ref_history]
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_of_finished_run_trains_nothing(digits_sources, tmp_path):
    cfg = _cfg(epochs=2)
    _, history, _ = _run(digits_sources, cfg, checkpoint_path=tmp_path / "c.pt")
    logs = []
    _, again, _ = _run(digits_sources, cfg, checkpoint_path=tmp_path / "c.pt", resume=True,
                       on_epoch=logs.append)
    assert logs == [] and len(again) == len(history)


def test_early_stopping(digits_sources):
    cfg = _cfg(epochs=30, early_stopping_patience=1)
    cfg.optimizer.lr = 0.2  # noisy on purpose, so validation accuracy stalls early
    _, history, best_epoch = _run(digits_sources, cfg)
    assert len(history) < 30
    assert len(history) - best_epoch == 2
