"""Hybrid parallelism: one data-parallel replica group per subdomain (run with
``mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests/test_hybrid_mpi.py``).

With P ranks the tests use S = P / 2 subdomains (vertical strips of the 8x8 scikit-learn
digits): 4 ranks -> 2 subdomains of 2 replicas, 2 ranks -> 1 subdomain of 2 replicas.
"""

import contextlib

import numpy as np
import pytest
import torch
from helpers import assert_all, digits_arrays

from ddmpi.data.schema import Normalization
from ddmpi.data.sources import TensorSource
from ddmpi.models.cnn import build_cnn
from ddmpi.parallel.data_parallel import DataParallel, ddp_over
from ddmpi.parallel.group import Group
from ddmpi.parallel.layout import MappingError, make_layout
from ddmpi.training.loop import Step, Trainer, fit, predict_proba

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]
CPU = torch.device("cpu")


@pytest.fixture
def world():
    world = Group.world()
    if world.size % 2:
        pytest.skip("needs an even number of ranks")      # same decision on every rank
    return world


def strips(num_subdomains, sub, start, stop):
    """TensorSource of subdomain ``sub`` (vertical strip of width 8/S) of digits[start:stop]."""
    images, labels = digits_arrays()
    width = 8 // num_subdomains
    x = np.ascontiguousarray(images[start:stop, :, :, sub * width:(sub + 1) * width])
    return TensorSource(x, labels[start:stop], Normalization([0.3], [0.4]))


def make_cnn(sub_width, seed, batchnorm=True):
    torch.manual_seed(seed)
    return build_cnn("vgg", 2, 1, 10, (8, sub_width), depth=2, width=4, batchnorm=batchnorm)


def trainer_of(model, lr, epochs, momentum=0.9):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return Trainer(model, opt, torch.optim.lr_scheduler.ConstantLR(opt, 1.0), epochs)


def test_layout_groups_and_owners(world):
    s_total = world.size // 2
    layout = make_layout(world, s_total)
    try:
        sub = world.rank // 2
        assert_all(world.comm, layout.owned == [sub], f"owned {layout.owned}")
        r = layout.replicas
        assert_all(world.comm, (r.size, r.rank) == (2, world.rank % 2), f"replicas {r}")
        members = r.allgather(world.rank)
        assert_all(world.comm, members == [2 * sub, 2 * sub + 1], f"members {members}")
        leaders = list(range(0, world.size, 2))
        is_leader = world.rank in leaders
        assert_all(world.comm, layout.owners.active == is_leader == layout.writes, "owners")
        if is_leader:
            ok = (layout.owners.size == s_total and layout.owners.rank == sub
                  and layout.owners.allgather(world.rank) == leaders)
        else:
            ok = layout.owners.rank == -1
        assert_all(world.comm, ok, "owners' group")
    finally:
        layout.replicas.free()
        layout.owners.free()

    one = make_layout(world, world.size)         # P == S: groups of one, everyone writes
    assert_all(world.comm, one.owned == [world.rank] and one.replicas.size == 1 and one.writes
               and one.owners.size == world.size, "P == S layout")
    fewer = make_layout(world, 2 * world.size + 1)   # P < S: balanced blocks
    assert_all(world.comm, sum(world.allgather(len(fewer.owned))) == 2 * world.size + 1,
               "P < S layout")


def test_p_not_a_multiple_of_s_is_a_clear_error(world):
    s_total = world.size - 1 if world.size > 2 else None
    if s_total is None:                                   # 2 ranks: no S < P with P % S != 0
        pytest.skip("needs 4 or more ranks")
    pattern = rf"\({world.size}\) to be a multiple .*\({s_total}\)"
    with pytest.raises(MappingError, match=pattern):
        make_layout(world, s_total)
    world.barrier()


@pytest.mark.parametrize("reduction", ["mpi", "ddp"])
def test_replicas_stay_identical_while_training(world, reduction):
    s_total = world.size // 2
    layout = make_layout(world, s_total)
    replicas, sub = layout.replicas, layout.owned[0]
    try:
        train, val = strips(s_total, sub, 0, 300), strips(s_total, sub, 300, 400)
        # Different initial weights per rank: training starts from the leader's copy.
        model = make_cnn(8 // s_total, seed=world.rank)
        start = make_cnn(8 // s_total, seed=world.rank)
        replicas.broadcast_module(start)
        replicas.broadcast_module(model)
        context = (ddp_over(replicas, CPU) if reduction == "ddp"
                   else contextlib.nullcontext(DataParallel(replicas)))
        with context as parallel:
            trainer = fit(trainer_of(model, 1e-2, 2), train, val, Step(CPU, parallel=parallel),
                          batch_size=25, seed=3)
        diff = replicas.max_difference(model)                   # parameters and BN buffers
        assert_all(world.comm, diff == 0.0, f"replicas differ by {diff} after training")
        hist = [(r.train_loss, r.train_accuracy, r.val_loss, r.val_accuracy)
                for r in trainer.history]
        hists = replicas.allgather(hist)
        assert_all(world.comm, hists[0] == hists[1], "history differs within a group")
        assert_all(world.comm, hist[-1][0] < hist[0][0], f"no learning: {hist}")
        moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(),
                                                          start.parameters()))
        assert_all(world.comm, moved, "no training happened")
    finally:
        replicas.free()
        layout.owners.free()


def test_data_parallel_training_equals_one_large_batch(world):
    """Without BatchNorm, 2 replicas with batch b take the steps of one model with batch 2b."""
    s_total = world.size // 2
    layout = make_layout(world, s_total)
    replicas, sub = layout.replicas, layout.owned[0]
    try:
        train, val = strips(s_total, sub, 0, 200), strips(s_total, sub, 200, 260)
        model = make_cnn(8 // s_total, seed=5, batchnorm=False)
        ref = make_cnn(8 // s_total, seed=5, batchnorm=False)
        parallel = DataParallel(replicas)
        got = fit(trainer_of(model, 0.05, 2), train, val, Step(CPU, parallel=parallel),
                  batch_size=40, seed=9)
        want = fit(trainer_of(ref, 0.05, 2), train, val, Step(CPU), batch_size=40, seed=9)
        diff = max((p - q).abs().max().item()
                   for p, q in zip(model.parameters(), ref.parameters()))
        assert_all(world.comm, diff < 1e-5, f"data-parallel vs large batch differ by {diff:.3g}")
        losses = [(a.train_loss, b.train_loss, a.val_accuracy, b.val_accuracy)
                  for a, b in zip(got.history, want.history)]
        ok = all(abs(a - b) < 1e-5 and abs(c - d) < 1e-6 for a, b, c, d in losses)
        assert_all(world.comm, ok, f"histories differ: {losses}")
    finally:
        replicas.free()
        layout.owners.free()


def test_decisions_reach_the_owners_and_world_rank_0(world):
    s_total = world.size // 2
    layout = make_layout(world, s_total)
    sub = layout.owned[0]
    try:
        source = strips(s_total, sub, 0, 101)               # odd N
        model = make_cnn(8 // s_total, seed=20 + sub).eval()
        probs = predict_proba(model, source, Step(CPU)).numpy()
        gathered = None
        if layout.owners.active:
            gathered = layout.owners.gather_decisions({sub: probs}, s_total, chunk_bytes=1000)
        everyone = world.allgather(probs if layout.writes else None)
        if world.rank == 0:
            ok = gathered.shape == (s_total, 101, 10) and all(
                np.array_equal(gathered[s], everyone[2 * s]) for s in range(s_total))
        else:
            ok = gathered is None
        assert_all(world.comm, ok, "decisions gathered on world rank 0 in subdomain order")
    finally:
        layout.replicas.free()
        layout.owners.free()
