"""Coherent CNN-DNN in one process (no MPI launch needed): layout, gather, random streams,
training through the shared loop, and the run's precision (RunContext.step)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import digits_subimages

from ddmpi.coarse.combiners import EPS
from ddmpi.coarse.dnn import CoarseNet, predict_coarse
from ddmpi.config import load_config
from ddmpi.data.schema import Normalization
from ddmpi.data.sources import TensorSource
from ddmpi.models.cnn import build_cnn
from ddmpi.models.coherent import (
    CoherentCNNDNN,
    CoherentError,
    GatherDecisions,
    RngStream,
    SubdomainLayout,
)
from ddmpi.strategies.base import RunContext
from ddmpi.strategies.coherent import Joint
from ddmpi.training.loop import Step, Trainer, fit, predict_proba

S, K = 4, 10


def make_models(dropout=0.0, inputs="log", depth=1):
    torch.manual_seed(0)
    local = {s: build_cnn("vgg", 2, 1, K, (4, 4), depth=depth, width=4, dropout=dropout)
             for s in range(S)}
    return local, CoarseNet(S, K, hidden=(16,), dropout=dropout, inputs=inputs)


def joint(start, stop):
    subs, labels = digits_subimages(start, stop)
    norm = Normalization([0.0], [1.0])
    return Joint({s: TensorSource(subs[s], labels, norm) for s in range(S)})


def test_layout_validates_ownership():
    layout = SubdomainLayout.from_group(None, [2, 0, 1, 3])
    assert layout.owned == (0, 1, 2, 3) and layout.num_subdomains == 4
    assert layout.gather_order == (0, 1, 2, 3)
    with pytest.raises(CoherentError, match="exactly once"):
        SubdomainLayout.from_group(None, [0, 1, 3])
    with pytest.raises(CoherentError, match="exactly once"):
        SubdomainLayout.from_group(None, [0, 1], num_subdomains=4)
    local, coarse = make_models()
    with pytest.raises(CoherentError, match="exactly once"):
        CoherentCNNDNN({0: local[0], 2: local[2]}, coarse, None)


def test_gather_single_process_is_identity_with_gradient():
    layout = SubdomainLayout.from_group(None, range(3))
    local = torch.randn(3, 5, 2, requires_grad=True)
    full = GatherDecisions.apply(local, None, layout)
    assert torch.equal(full, local.detach())
    weight = torch.randn(3, 5, 2)
    (full * weight).sum().backward()
    assert torch.equal(local.grad, weight)


@pytest.mark.parametrize("inputs", ["log", "prob"])
def test_forward_is_the_coarse_model_on_the_local_decisions(inputs):
    """The coherent model's probabilities are predict_coarse on the local CNNs' (S, N, K)
    decisions: the CNN-DNN's coarse model sees exactly what it was trained on."""
    local, coarse = make_models(inputs=inputs)
    with torch.no_grad():
        coarse.mlp[-1].weight.normal_()      # a non-trivial correction on top of the skip path
    subs, _ = digits_subimages(0, 8)
    model = CoherentCNNDNN(local, coarse, None, seed=None).eval()
    with torch.no_grad():
        outs = [torch.softmax(local[s](subs[s]), 1) for s in range(S)]
        got = model(subs)
        flat = torch.cat(outs, dim=1)
        expected = coarse(torch.log(flat + EPS) if inputs == "log" else flat)
    assert torch.allclose(got, expected, atol=1e-6)
    decisions = torch.stack(outs).numpy()
    ref = predict_coarse(coarse, decisions)
    assert np.abs(torch.softmax(got.double(), 1).numpy() - ref).max() < 1e-6


def test_rng_stream_is_private_and_restores_global_state():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(1000)
    a, b = RngStream(5), RngStream(5)
    torch.manual_seed(0)
    with a.active():
        first = drop(x)
    torch.rand(123)                              # global stream moves on; private one does not
    with b.active():
        same = drop(x)
    assert torch.equal(first, same)
    before = torch.get_rng_state()
    with a.active():
        second = drop(x)                         # the stream continues, not restarts
    assert not torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), before)


def test_joint_batches_and_epoch_order_are_shared_and_epoch_dependent():
    data = joint(0, 50)
    assert torch.equal(data.epoch_order(3, 1), data.epoch_order(3, 1))
    assert not torch.equal(data.epoch_order(3, 1), data.epoch_order(3, 2))
    assert sorted(data.epoch_order(3, 1).tolist()) == list(range(50))
    subs, labels = digits_subimages(0, 50)
    order = data.epoch_order(3, 0)
    x, y, idx = next(data.batches(order, 16))
    assert set(x) == set(range(S)) and torch.equal(idx, order[:16])
    assert torch.equal(y, labels[order[:16]])
    assert all(torch.equal(x[s], subs[s][order[:16]]) for s in range(S))


def test_coherent_training_single_process_learns_digits():
    local, coarse = make_models(dropout=0.1, depth=2)
    model = CoherentCNNDNN(local, coarse, None, seed=1)
    train, val = joint(0, 400), joint(400, 560)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1),
                      epochs=6)
    step = Step(torch.device("cpu"))
    fit(trainer, train, val, step, batch_size=32, seed=1)
    hist = trainer.history
    assert [r.epoch for r in hist] == [1, 2, 3, 4, 5, 6]
    assert hist[-1].train_loss < hist[0].train_loss
    assert max(r.val_accuracy for r in hist) > 0.4          # chance: 0.1
    probs = predict_proba(model, val, step).numpy()          # best state loaded by fit
    acc = float((probs.argmax(1) == val.labels.numpy()).mean())
    assert acc == pytest.approx(trainer.best["accuracy"])


def test_gradients_reach_every_cnn_and_the_coarse_model():
    local, coarse = make_models()
    subs, labels = digits_subimages(0, 16)
    model = CoherentCNNDNN(local, coarse, None)
    F.cross_entropy(model(subs), labels).backward()
    for s in range(S):
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for p in local[s].parameters() if p.requires_grad), s
    assert coarse.skip_weight.grad is not None and coarse.skip_weight.grad.abs().sum() > 0


def _context(device, amp, channels_last="auto", spatial_dims=2):
    config = load_config(None, ["data.path=x.h5", f"run.amp={amp}",
                                f"run.channels_last={channels_last}"])
    binding = SimpleNamespace(device=torch.device(device))
    info = SimpleNamespace(spatial_dims=spatial_dims)
    return RunContext(config, world=None, run_dir=None, log=None, info=info, binding=binding,
                      resume=False)


@pytest.mark.parametrize("device, amp, expected", [
    ("cuda", "auto", True), ("cuda", "true", True), ("cuda", "false", False),
    ("cpu", "auto", False), ("cpu", "false", False), ("cpu", "true", True)])
def test_run_context_step_honours_run_amp(device, amp, expected):
    """The coherent strategy's Step comes from RunContext.step: run.amp and the device decide
    (only the Step's fields are checked; nothing runs on the device)."""
    step = _context(device, amp).step(augment=None, hooks=())
    assert isinstance(step, Step)
    assert step.device == torch.device(device) and step.amp is expected


def test_run_context_step_channels_last_and_extra_fields():
    assert _context("cuda", "auto").step().channels_last is True
    assert _context("cuda", "auto", spatial_dims=3).step().channels_last is False
    assert _context("cpu", "auto").step().channels_last is False
    assert _context("cuda", "auto", channels_last="false").step().channels_last is False
    hook = object()
    step = _context("cpu", "auto").step(hooks=(hook,))
    assert step.hooks == (hook,) and step.parallel is None
