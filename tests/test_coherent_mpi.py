"""Coherent CNN-DNN across ranks equals the same model in one process (run with
``mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests/test_coherent_mpi.py``).

Real data: scikit-learn's 8x8 digits cut into a 2x2 grid of 4x4 subimages (S = 4 subdomains).
Every rank builds all S local CNNs and the coarse DNN from fixed seeds, so each rank can also
run the whole model itself (plain autograd, all subdomains local) as the reference.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all, digits_subimages
from mpi4py import MPI

from ddmpi.models.coherent import (CoherentCNNDNN, CoherentError, RngStream, batch_order,
                            max_replica_difference, module_vector, train_coherent)
from ddmpi.parallel.mapping import assign_subdomains
from ddmpi.models.cnn import CoarseDNN, build_cnn

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

S, K = 4, 10
SEED = 11
RTOL = 1e-6            # |distributed - reference| <= RTOL * max(1, max |reference|)


@pytest.fixture
def comm():
    comm = MPI.COMM_WORLD
    if comm.size > S:
        pytest.skip(f"{comm.size} ranks for {S} subdomains")   # same decision on every rank
    return comm


def make_models(dropout=0.0):
    """All S local CNNs and the coarse DNN, identical on every rank and every call."""
    local = {}
    for s in range(S):
        torch.manual_seed(100 + s)
        local[s] = build_cnn("vgg", 2, 1, K, (4, 4), depth=2, width=4, dropout=dropout)
    torch.manual_seed(7)
    coarse = CoarseDNN(S * K, K, hidden=(16,), dropout=dropout)
    return local, coarse


def ownership(kind, comm):
    blocks = assign_subdomains(S, comm.size)
    if kind == "blocks":
        return blocks[comm.rank]
    if kind == "round_robin":
        return [s for s in range(S) if s % comm.size == comm.rank]
    if kind == "reversed":                       # rank 0 owns the last block
        return blocks[comm.size - 1 - comm.rank]
    raise AssertionError(kind)


def reference_logits(local, coarse, xb, streams):
    """The whole CNN-DNN in one process with plain autograd (same random streams)."""
    outs = []
    for s in range(S):
        with streams[s].active():
            outs.append(torch.softmax(local[s](xb[s]), dim=1))
    with streams["coarse"].active():
        return coarse(torch.cat(outs, dim=1))


def rel_diff(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def max_grad_diffs(model, ref_local, ref_coarse):
    local = max((rel_diff(p.grad, q.grad) for s in model.owned
                 for p, q in zip(model.local[str(s)].parameters(), ref_local[s].parameters())),
                default=0.0)
    coarse = max(rel_diff(p.grad, q.grad)
                 for p, q in zip(model.coarse.parameters(), ref_coarse.parameters()))
    return local, coarse


def max_param_diff(model, ref_local, ref_coarse):
    pairs = [(p, q) for s in model.owned
             for p, q in zip(model.local[str(s)].parameters(), ref_local[s].parameters())]
    pairs += list(zip(model.coarse.parameters(), ref_coarse.parameters()))
    return max(rel_diff(p.detach(), q.detach()) for p, q in pairs)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("kind", ["blocks", "round_robin", "reversed"])
def test_gradients_and_steps_match_single_process(comm, kind, dropout):
    owned = ownership(kind, comm)
    subs, labels = digits_subimages(0, 192)
    ref_local, ref_coarse = make_models(dropout)
    dist_local, dist_coarse = make_models(dropout)
    model = CoherentCNNDNN({s: dist_local[s] for s in owned}, dist_coarse, comm, seed=SEED)
    assert_all(comm, model.owned == tuple(owned), f"owned {model.owned} != {owned}")
    streams = {s: RngStream(SEED + s) for s in range(S)}
    streams["coarse"] = RngStream(SEED + S)
    ref_params = [p for m in [*ref_local.values(), ref_coarse] for p in m.parameters()]
    ref_opt = torch.optim.Adam(ref_params, lr=1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for m in [*ref_local.values(), ref_coarse]:
        m.train()

    order = torch.from_numpy(batch_order(len(labels), SEED, 0))
    diffs = []
    for step in range(4):
        idx = order[step * 48:(step + 1) * 48]
        yb = labels[idx]
        ref_opt.zero_grad()
        ref_loss = F.cross_entropy(reference_logits(ref_local, ref_coarse,
                                                    {s: subs[s][idx] for s in range(S)},
                                                    streams), yb)
        ref_loss.backward()
        opt.zero_grad()
        loss = F.cross_entropy(model({s: subs[s][idx] for s in owned}), yb)
        loss.backward()
        assert_all(comm, abs(loss.item() - ref_loss.item()) <= RTOL * max(1, ref_loss.item()),
                   f"step {step}: loss {loss.item()} vs reference {ref_loss.item()}")
        local_diff, coarse_diff = max_grad_diffs(model, ref_local, ref_coarse)
        diffs.append(max(local_diff, coarse_diff))
        assert_all(comm, local_diff <= RTOL, f"step {step}: local CNN gradients differ by "
                                             f"{local_diff:.3g} (relative)")
        assert_all(comm, coarse_diff <= RTOL, f"step {step}: coarse gradients differ by "
                                              f"{coarse_diff:.3g} (relative)")
        ref_opt.step()
        opt.step()
    param_diff = max_param_diff(model, ref_local, ref_coarse)
    assert_all(comm, param_diff <= RTOL, f"parameters after 4 Adam steps differ by "
                                         f"{param_diff:.3g}")
    worst = comm.allreduce(max(diffs + [param_diff]), op=MPI.MAX)
    if comm.rank == 0:
        print(f"\n[coherent {kind} dropout={dropout} P={comm.size}] max relative "
              f"gradient/parameter difference {worst:.3g}")
    # The coarse DNN replicas are bitwise identical on every rank.
    assert_all(comm, max_replica_difference(comm, model.coarse) == 0.0,
               "coarse DNN replicas differ")


def test_replicated_coarse_dnn_stays_identical(comm):
    owned = assign_subdomains(S, comm.size)[comm.rank]
    subs, labels = digits_subimages(0, 256)
    local, coarse = make_models(dropout=0.25)
    # Deliberately desynchronise the replicas: construction must broadcast rank 0's copy.
    with torch.no_grad():
        next(coarse.parameters()).add_(comm.rank)
    model = CoherentCNNDNN({s: local[s] for s in owned}, coarse, comm, seed=SEED)
    assert_all(comm, max_replica_difference(comm, model.coarse) == 0.0, "not broadcast")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.from_numpy(batch_order(len(labels), SEED, 0))
    for step in range(6):
        idx = order[step * 32:(step + 1) * 32]
        opt.zero_grad()
        F.cross_entropy(model({s: subs[s][idx] for s in owned}), labels[idx]).backward()
        opt.step()
    vectors = comm.allgather(module_vector(model.coarse))
    assert_all(comm, all(np.array_equal(v, vectors[0]) for v in vectors),
               "coarse DNN replicas differ after 6 SGD steps")
    assert_all(comm, not np.array_equal(vectors[0], module_vector(make_models(0.25)[1])),
               "coarse DNN did not train")


def test_train_coherent_equals_single_process_and_learns(comm):
    owned = assign_subdomains(S, comm.size)[comm.rank]
    train_x, train_y = digits_subimages(0, 480)
    val_x, val_y = digits_subimages(480, 640)
    test_x, test_y = digits_subimages(640, 800)
    kwargs = dict(epochs=3, batch_size=32, lr=1e-2, seed=SEED)

    local, coarse = make_models()
    hist = train_coherent({s: local[s] for s in owned}, coarse,
                          {s: train_x[s] for s in owned}, train_y, comm,
                          val=({s: val_x[s] for s in owned}, val_y),
                          test=({s: test_x[s] for s in owned}, test_y), **kwargs)
    ref_local, ref_coarse = make_models()
    ref = train_coherent(ref_local, ref_coarse, train_x, train_y, None,
                         val=(val_x, val_y), test=(test_x, test_y), **kwargs)

    hists = comm.allgather({k: v for k, v in hist.items() if k != "seconds"})
    assert_all(comm, all(h == hists[0] for h in hists), "history differs between ranks")
    assert_all(comm, hist["coarse_replica_diff"] == [0.0] * 3, hist["coarse_replica_diff"])
    for key in ("train_loss", "val_loss"):
        gap = max(abs(a - b) for a, b in zip(hist[key], ref[key]))
        assert_all(comm, gap <= 1e-5, f"{key} {hist[key]} vs single process {ref[key]}")
    assert_all(comm, abs(hist["test_acc"] - ref["test_acc"]) < 1e-9,
               f"test accuracy {hist['test_acc']} vs {ref['test_acc']}")
    assert_all(comm, hist["val_acc"][-1] > 0.3, f"val accuracy {hist['val_acc']}")  # chance: 0.1
    assert_all(comm, hist["train_loss"][-1] < hist["train_loss"][0], hist["train_loss"])
    diff = max(rel_diff(p.detach(), q.detach()) for s in owned
               for p, q in zip(local[s].parameters(), ref_local[s].parameters()))
    assert_all(comm, diff <= 1e-4, f"local CNN parameters differ by {diff:.3g} after training")


def test_transfer_learning_from_state_dicts(comm):
    owned = assign_subdomains(S, comm.size)[comm.rank]
    train_x, train_y = digits_subimages(0, 320)
    test_x, test_y = digits_subimages(640, 800)
    local, coarse = make_models()
    first = train_coherent({s: local[s] for s in owned}, coarse,
                           {s: train_x[s] for s in owned}, train_y, comm,
                           test=({s: test_x[s] for s in owned}, test_y), epochs=2, lr=1e-2)
    # Every rank passes the states of all S local CNNs (only its own are used)...
    all_states = {s: m.state_dict() for s, m in local.items() if s in owned}
    all_states = {s: st for part in comm.allgather(all_states) for s, st in part.items()}
    torch.manual_seed(1234 + comm.rank)          # ...into freshly, differently seeded models.
    fresh_local = {s: build_cnn("vgg", 2, 1, K, (4, 4), depth=2, width=4) for s in owned}
    fresh_coarse = CoarseDNN(S * K, K, hidden=(16,))
    loaded = train_coherent(fresh_local, fresh_coarse, {s: train_x[s] for s in owned},
                            train_y, comm, test=({s: test_x[s] for s in owned}, test_y),
                            epochs=0, local_states=all_states,
                            coarse_state=coarse.state_dict())
    assert_all(comm, loaded["test_acc"] == first["test_acc"],
               f"loaded model test accuracy {loaded['test_acc']} != {first['test_acc']}")
    tuned = train_coherent(fresh_local, fresh_coarse, {s: train_x[s] for s in owned},
                           train_y, comm, epochs=1, lr=1e-3, local_lr=1e-4)
    assert_all(comm, len(tuned["train_loss"]) == 1, tuned)


def test_inconsistent_ownership_raises_on_every_rank(comm):
    local, coarse = make_models()
    with pytest.raises(CoherentError, match="exactly once"):
        CoherentCNNDNN({0: local[0]}, coarse, comm)          # every rank claims subdomain 0
