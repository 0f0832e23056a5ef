"""Coherent CNN-DNN in one process (no MPI launch needed): layout, gather, random streams."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import digits_subimages

from ddmpi.models.coherent import (CoherentCNNDNN, CoherentError, RngStream, SubdomainLayout,
                            batch_order, gather_decisions, train_coherent)
from ddmpi.models.cnn import CoarseDNN, build_cnn

S, K = 4, 10


def make_models(dropout=0.0):
    torch.manual_seed(0)
    local = {s: build_cnn("vgg", 2, 1, K, (4, 4), depth=1, width=4, dropout=dropout)
             for s in range(S)}
    return local, CoarseDNN(S * K, K, hidden=(16,), dropout=dropout)


def test_layout_validates_ownership():
    layout = SubdomainLayout.from_comm(None, [2, 0, 1, 3])
    assert layout.owned == (0, 1, 2, 3) and layout.num_subdomains == 4
    with pytest.raises(CoherentError, match="exactly once"):
        SubdomainLayout.from_comm(None, [0, 1, 3])
    with pytest.raises(CoherentError, match="exactly once"):
        SubdomainLayout.from_comm(None, [0, 1], num_subdomains=4)


def test_gather_single_process_is_identity_with_gradient():
    layout = SubdomainLayout.from_comm(None, range(3))
    local = torch.randn(3, 5, 2, requires_grad=True)
    full = gather_decisions(local, None, layout)
    assert torch.equal(full, local.detach())
    weight = torch.randn(3, 5, 2)
    (full * weight).sum().backward()
    assert torch.equal(local.grad, weight)


def test_forward_concatenates_in_subdomain_order():
    local, coarse = make_models()
    subs, _ = digits_subimages(0, 8)
    for output in ("probabilities", "logits"):
        model = CoherentCNNDNN(local, coarse, None, output=output, seed=None).eval()
        outs = [local[s](subs[s]) for s in range(S)]
        if output == "probabilities":
            outs = [torch.softmax(o, 1) for o in outs]
        expected = coarse(torch.cat(outs, dim=1))
        assert torch.allclose(model(subs), expected, atol=1e-6)
    with pytest.raises(CoherentError, match="output"):
        CoherentCNNDNN(local, coarse, None, output="softmax")


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


def test_batch_order_is_shared_and_epoch_dependent():
    assert np.array_equal(batch_order(50, 3, 1), batch_order(50, 3, 1))
    assert not np.array_equal(batch_order(50, 3, 1), batch_order(50, 3, 2))
    assert sorted(batch_order(50, 3, 1)) == list(range(50))


def test_train_coherent_single_process_learns_digits():
    torch.manual_seed(0)
    local = {s: build_cnn("vgg", 2, 1, K, (4, 4), depth=2, width=4, dropout=0.1)
             for s in range(S)}
    coarse = CoarseDNN(S * K, K, hidden=(16,), dropout=0.1)
    train_x, train_y = digits_subimages(0, 400)
    val_x, val_y = digits_subimages(400, 560)
    hist = train_coherent(local, coarse, train_x, train_y, None, val=(val_x, val_y),
                          test=(val_x, val_y), epochs=6, batch_size=32, lr=1e-2, seed=1)
    assert hist["epoch"] == [1, 2, 3, 4, 5, 6]
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert hist["val_acc"][-1] > 0.4          # chance: 0.1
    assert hist["test_acc"] == pytest.approx(hist["val_acc"][-1])


def test_train_coherent_rejects_mismatched_inputs():
    local, coarse = make_models()
    train_x, train_y = digits_subimages(0, 40)
    train_x[2] = train_x[2][:30]
    with pytest.raises(CoherentError, match="subdomains"):
        train_coherent(local, coarse, train_x, train_y, None, epochs=1)
    with pytest.raises(CoherentError, match="optimizer"):
        train_coherent(local, coarse, digits_subimages(0, 40)[0], train_y, None,
                       optimizer="lbfgs")


def test_logits_option_trains_and_gradients_reach_every_cnn():
    local, coarse = make_models()
    subs, labels = digits_subimages(0, 16)
    model = CoherentCNNDNN(local, coarse, None, output="logits")
    F.cross_entropy(model(subs), labels).backward()
    for s in range(S):
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for p in local[s].parameters() if p.requires_grad), s
