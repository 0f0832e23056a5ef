"""Coherent CNN-DNN across ranks equals the same model in one process (run with
``mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests/test_coherent_mpi.py``).

Real data: scikit-learn's 8x8 digits cut into a 2x2 grid of 4x4 subimages (S = 4 subdomains).
Every rank builds all S local CNNs and the coarse network from fixed seeds, so each rank can
also run the whole model itself (``CoherentCNNDNN`` with ``group=None``, all subdomains local)
as the reference.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all, digits_subimages

from ddmpi.coarse.dnn import CoarseNet
from ddmpi.data.schema import Normalization
from ddmpi.data.sources import TensorSource
from ddmpi.models.cnn import build_cnn
from ddmpi.models.coherent import CoherentCNNDNN, CoherentError
from ddmpi.parallel.group import Group
from ddmpi.parallel.layout import assign_subdomains
from ddmpi.strategies.coherent import Joint
from ddmpi.training.loop import Step, Trainer, fit, predict_proba

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

S, K = 4, 10
SEED = 11
RTOL = 1e-6            # |distributed - reference| <= RTOL * max(1, max |reference|)


@pytest.fixture
def world():
    world = Group.world()
    if world.size > S:
        pytest.skip(f"{world.size} ranks for {S} subdomains")   # same decision on every rank
    return world


def make_models(dropout=0.0):
    """All S local CNNs and the coarse network, identical on every rank and every call."""
    local = {}
    for s in range(S):
        torch.manual_seed(100 + s)
        local[s] = build_cnn("vgg", 2, 1, K, (4, 4), depth=2, width=4, dropout=dropout)
    torch.manual_seed(7)
    coarse = CoarseNet(S, K, hidden=(16,), dropout=dropout)
    with torch.no_grad():                         # a non-zero correction: gradients everywhere
        coarse.mlp[-1].weight.normal_(0, 0.1)
    return local, coarse


def ownership(kind, world):
    blocks = assign_subdomains(S, world.size)
    if kind == "blocks":
        return blocks[world.rank]
    if kind == "round_robin":
        return [s for s in range(S) if s % world.size == world.rank]
    if kind == "reversed":                       # rank 0 owns the last block
        return blocks[world.size - 1 - world.rank]
    raise AssertionError(kind)


def rel_diff(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def pairs(model, ref, grads):
    """(distributed, reference) tensors of this rank's CNNs and the coarse replica."""
    out = [(p, q) for s in model.owned
           for p, q in zip(model.local[str(s)].parameters(), ref.local[str(s)].parameters())]
    out += list(zip(model.coarse.parameters(), ref.coarse.parameters()))
    return [(p.grad, q.grad) if grads else (p.detach(), q.detach()) for p, q in out]


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("kind", ["blocks", "round_robin", "reversed"])
def test_gradients_and_steps_match_single_process(world, kind, dropout):
    owned = ownership(kind, world)
    subs, labels = digits_subimages(0, 192)
    ref_local, ref_coarse = make_models(dropout)
    dist_local, dist_coarse = make_models(dropout)
    ref = CoherentCNNDNN(ref_local, ref_coarse, None, seed=SEED).train()
    model = CoherentCNNDNN({s: dist_local[s] for s in owned}, dist_coarse, world,
                           seed=SEED).train()
    assert_all(world, model.owned == tuple(sorted(owned)), f"owned {model.owned} != {owned}")
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    worst = 0.0
    for step in range(4):
        idx = order[step * 48:(step + 1) * 48]
        yb = labels[idx]
        ref_opt.zero_grad()
        ref_loss = F.cross_entropy(ref({s: subs[s][idx] for s in range(S)}), yb)
        ref_loss.backward()
        opt.zero_grad()
        loss = F.cross_entropy(model({s: subs[s][idx] for s in owned}), yb)
        loss.backward()
        assert_all(world, abs(loss.item() - ref_loss.item()) <= RTOL * max(1, ref_loss.item()),
                   f"step {step}: loss {loss.item()} vs reference {ref_loss.item()}")
        missing = [i for i, (g, _) in enumerate(pairs(model, ref, True)) if g is None]
        assert_all(world, not missing, f"step {step}: no gradient for parameters {missing}")
        diff = max(rel_diff(g, h) for g, h in pairs(model, ref, True))
        worst = max(worst, diff)
        assert_all(world, diff <= RTOL, f"step {step}: gradients differ by {diff:.3g} "
                                        f"(relative)")
        ref_opt.step()
        opt.step()
    param_diff = max(rel_diff(p, q) for p, q in pairs(model, ref, False))
    assert_all(world, param_diff <= RTOL, f"parameters after 4 Adam steps differ by "
                                          f"{param_diff:.3g}")
    worst = world.max(max(worst, param_diff))
    if world.rank == 0:
        print(f"\n[coherent {kind} dropout={dropout} P={world.size}] max relative "
              f"gradient/parameter difference {worst:.3g}")
    # The coarse replicas are bitwise identical on every rank.
    assert_all(world, world.max_difference(model.coarse) == 0.0, "coarse replicas differ")


def test_replicated_coarse_network_stays_identical(world):
    owned = assign_subdomains(S, world.size)[world.rank]
    subs, labels = digits_subimages(0, 256)
    local, coarse = make_models(dropout=0.25)
    # Deliberately desynchronise the replicas: construction must broadcast rank 0's copy.
    with torch.no_grad():
        next(coarse.parameters()).add_(world.rank)
    model = CoherentCNNDNN({s: local[s] for s in owned}, coarse, world, seed=SEED)
    assert_all(world, world.max_difference(model.coarse) == 0.0, "not broadcast")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    for step in range(6):
        idx = order[step * 32:(step + 1) * 32]
        opt.zero_grad()
        F.cross_entropy(model({s: subs[s][idx] for s in owned}), labels[idx]).backward()
        opt.step()
    assert_all(world, world.max_difference(model.coarse) == 0.0,
               "coarse replicas differ after 6 SGD steps")
    untrained = make_models(0.25)[1]
    moved = max((p - q).abs().max().item()
                for p, q in zip(model.coarse.parameters(), untrained.parameters()))
    assert_all(world, moved > 0, "coarse network did not train")


def joint(start, stop, subdomains):
    subs, labels = digits_subimages(start, stop)
    norm = Normalization([0.0], [1.0])
    return Joint({s: TensorSource(subs[s], labels, norm) for s in subdomains})


def train(model, subdomains, epochs=3):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer(model, optimizer,
                      torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0), epochs)
    step = Step(torch.device("cpu"))
    fit(trainer, joint(0, 480, subdomains), joint(480, 640, subdomains), step, batch_size=32,
        seed=SEED)
    return trainer, predict_proba(model, joint(640, 800, subdomains), step)


def test_training_loop_equals_single_process_and_learns(world):
    """The shared training loop (fit over Joint sources) on the distributed model gives the
    single-process history, test probabilities and parameters."""
    owned = assign_subdomains(S, world.size)[world.rank]
    local, coarse = make_models()
    trainer, probs = train(CoherentCNNDNN({s: local[s] for s in owned}, coarse, world,
                                          seed=SEED), owned)
    ref_local, ref_coarse = make_models()
    ref, ref_probs = train(CoherentCNNDNN(ref_local, ref_coarse, None, seed=SEED), range(S))

    hist = [(r.train_loss, r.val_loss, r.val_accuracy) for r in trainer.history]
    hists = world.allgather(hist)
    assert_all(world, all(h == hists[0] for h in hists), "history differs between ranks")
    for i, key in enumerate(("train_loss", "val_loss")):
        gap = max(abs(a[i] - b[i]) for a, b in zip(
            hist, [(r.train_loss, r.val_loss) for r in ref.history]))
        assert_all(world, gap <= 1e-5, f"{key} differs from the single process by {gap:.3g}")
    assert_all(world, trainer.best["epoch"] == ref.best["epoch"], "best epoch differs")
    gap = (probs - ref_probs).abs().max().item()
    assert_all(world, gap <= 1e-5, f"test probabilities differ by {gap:.3g}")
    assert_all(world, max(r.val_accuracy for r in trainer.history) > 0.3,
               f"val accuracy {[r.val_accuracy for r in trainer.history]}")  # chance: 0.1
    assert_all(world, hist[-1][0] < hist[0][0], "training loss did not fall")
    diff = max(rel_diff(p.detach(), q.detach()) for s in owned
               for p, q in zip(local[s].parameters(), ref_local[s].parameters()))
    assert_all(world, diff <= 1e-4, f"local CNN parameters differ by {diff:.3g} after training")
    assert_all(world, world.max_difference(trainer.model.coarse) == 0.0,
               "coarse replicas differ after training")


def test_inconsistent_ownership_raises_on_every_rank(world):
    local, coarse = make_models()
    with pytest.raises(CoherentError, match="exactly once"):
        CoherentCNNDNN({0: local[0]}, coarse, world)          # every rank claims subdomain 0
