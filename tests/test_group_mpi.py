"""Every collective of :class:`ddmpi.parallel.group.Group`, on several groups (in the style of
mpi4py's test_cco_obj.py: one body per collective, run over world, a split into halves and a
duplicate, each freed after use). Run with
``mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests/test_group_mpi.py``."""

import math

import numpy as np
import pytest
import torch
from helpers import assert_all

from ddmpi.parallel.group import Group

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(60)]

GROUPS = ["world", "halves", "duplicate"]


@pytest.fixture(params=GROUPS)
def group(request):
    """(world, group): ``group`` is freed after the test (world is never freed)."""
    world = Group.world()
    if request.param == "world":
        yield world, world
        return
    group = world.split(world.rank % 2) if request.param == "halves" else world.duplicate()
    try:
        yield world, group
    finally:
        group.free()
        assert_all(world.comm, not group.active, "group still active after free")


def check(world, ok, message):
    assert_all(world.comm, ok, message)


def small_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                               torch.nn.Linear(4, 2))


def test_membership(group):
    world, g = group
    members = g.allgather(world.rank)
    check(world, g.active and 0 <= g.rank < g.size and len(members) == g.size,
          f"{g}: members {members}")
    check(world, members == sorted(members), "split/duplicate keeps the parent's rank order")
    check(world, g.is_root == (g.rank == 0), "is_root")


def test_split_outside_is_inactive():
    world = Group.world()
    inner = world.split(0 if world.rank == 0 else None)
    try:
        ok = (inner.active and inner.size == 1 and inner.is_root) if world.rank == 0 else (
            not inner.active and inner.rank == -1 and inner.size == 0 and not inner.is_root
            and "inactive" in repr(inner))
        check(world, ok, f"rank {world.rank}: {inner!r}")
    finally:
        inner.free()
    inactive = world.split(None)                        # nobody is a member
    check(world, not inactive.active, "split(None) everywhere is inactive")
    inactive.free()                                     # freeing an inactive group is a no-op
    check(world, Group.single().size == 1 and Group.single().is_root, "single")


def test_split_key_orders_ranks():
    world = Group.world()
    rev = world.split(0, key=world.size - 1 - world.rank)
    try:
        check(world, rev.rank == world.size - 1 - world.rank, f"reversed rank {rev.rank}")
    finally:
        rev.free()


def test_objects(group):
    world, g = group
    got = g.bcast({"root": g.rank} if g.rank == 0 else None)
    check(world, got == {"root": 0}, f"bcast {got}")
    if g.size > 1:
        last = g.bcast(g.rank, root=g.size - 1)
        check(world, last == g.size - 1, f"bcast from last {last}")
    gathered = g.gather(g.rank * 10)
    check(world, gathered == [10 * r for r in range(g.size)] if g.rank == 0 else gathered is None,
          f"gather {gathered}")
    check(world, g.allgather(g.rank) == list(range(g.size)), "allgather")
    g.barrier()


def test_reductions(group):
    world, g = group
    total = g.sum([1, g.rank, 0.5])
    check(world, isinstance(total, np.ndarray) and total.dtype == np.float64
          and total.tolist() == [g.size, g.size * (g.size - 1) / 2, g.size / 2], f"sum {total}")
    check(world, g.max(g.rank) == g.size - 1 and g.max(-1.5) == -1.5, "max")
    check(world, g.all(True) and not g.all(g.rank != 0) and not g.all(False), "all")
    check(world, g.any(g.rank == g.size - 1) and not g.any(False) and g.any(True), "any")


def test_tensor_means(group):
    world, g = group
    a = torch.full((2, 3), float(g.rank))
    b = torch.arange(4, dtype=torch.float64) * (g.rank + 1)
    g.allreduce_mean([a, b])
    mean_rank = (g.size - 1) / 2
    check(world, torch.equal(a, torch.full((2, 3), mean_rank)), f"float32 mean {a}")
    check(world, torch.allclose(b, torch.arange(4, dtype=torch.float64) * (mean_rank + 1)),
          f"float64 mean {b}")
    g.allreduce_mean([])                                  # nothing to do, must not hang

    model = small_model(seed=world.rank)
    model(torch.randn(5, 3)).sum().backward()
    model[2].weight.grad = None                           # a parameter without a gradient
    grads = g.allgather([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                         for p in model.parameters()])
    g.mean_gradients(model)
    ok = all(torch.allclose(p.grad, sum(r[i] for r in grads) / g.size, atol=1e-6)
             for i, p in enumerate(model.parameters()))
    check(world, ok, "mean_gradients")
    stats = g.allgather([b.clone() for b in model.buffers()])
    g.mean_buffers(model)
    bn = model[1]
    ok = (torch.allclose(bn.running_mean, sum(s[0] for s in stats) / g.size, atol=1e-6)
          and torch.equal(bn.num_batches_tracked, stats[0][2]))
    check(world, ok, "mean_buffers")


def test_broadcast_module_and_max_difference(group):
    world, g = group
    model = small_model(seed=100 + world.rank)
    model(torch.randn(6, 3))                              # running statistics differ too
    diff = g.max_difference(model)
    check(world, diff > 0 if g.size > 1 else diff == 0, f"different models: {diff}")
    ref = g.bcast(model.state_dict())
    g.broadcast_module(model)
    diff = g.max_difference(model)
    check(world, diff == 0.0, f"after broadcast: {diff}")
    same = all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    check(world, same, "broadcast_module gives root's state, buffers included")
    if g.size > 1:
        with torch.no_grad():
            model[0].bias[0] += 0.25 if g.rank == g.size - 1 else 0.0
        diff = g.max_difference(model)
        check(world, abs(diff - 0.25) < 1e-6, f"one changed rank: {diff}")
        g.broadcast_module(model, root=g.size - 1)
        check(world, g.max_difference(model, root=1) == 0.0, "broadcast from the last rank")
        other = small_model(0) if g.rank else torch.nn.Linear(3, 4)
        diff = g.max_difference(other)
        check(world, diff == math.inf, f"different architectures: {diff}")


def test_allgatherv_and_gatherv_rows(group):
    world, g = group
    counts = [r + 1 for r in range(g.size)]
    mine = np.full((counts[g.rank], 2), g.rank, np.float64)
    out = g.allgatherv(mine, counts)
    expected = np.concatenate([np.full((c, 2), r, np.float64) for r, c in enumerate(counts)])
    check(world, np.array_equal(out, expected), "allgatherv")
    flat = g.allgatherv(np.arange(counts[g.rank], dtype=np.float32), counts)
    check(world, flat.tolist() == [float(i) for c in counts for i in range(c)], "1-D allgatherv")
    rows = np.full((g.rank, 3), g.rank, np.float32)    # rank 0 sends no rows
    got = g.gatherv_rows(rows)
    expected = np.concatenate([np.full((r, 3), r, np.float32) for r in range(g.size)])
    ok = np.array_equal(got, expected) if g.rank == 0 else got is None
    check(world, ok, f"gatherv_rows {None if got is None else got.shape}")
    with pytest.raises(TypeError, match="float32/float64"):
        g.allgatherv(np.zeros((1, 2), np.int64), [1] * g.size)     # refused before any call
    for n in (0, 1, 7):                                # row shares gather back in order
        share = np.arange(n, dtype=np.float32)[g.row_share(n)].reshape(-1, 1)
        got = g.gatherv_rows(share)
        ok = got.ravel().tolist() == list(range(n)) if g.rank == 0 else got is None
        check(world, ok, f"row_share({n})")


def test_gather_decisions(group):
    world, g = group
    local = {g.rank: np.full((7, 2), g.rank, np.float32)}
    got = g.gather_decisions(local, g.size, chunk_bytes=16)
    expected = np.stack([np.full((7, 2), r, np.float32) for r in range(g.size)])
    check(world, np.array_equal(got, expected) if g.rank == 0 else got is None, "decisions")


@pytest.mark.parametrize("raiser, step", [(0, 0), (-1, 3)])
def test_stop_vote_one_step_late_on_every_rank(group, raiser, step):
    """Voting every step: a flag raised on one rank at step t is seen by all at step t + 1."""
    world, g = group
    vote = g.stop_vote(every=1)
    raiser = raiser % g.size
    outcomes = [vote.poll(g.rank == raiser and t == step) for t in range(6)]
    final = vote.finish(False)
    expected = [t == step + 1 for t in range(6)]
    check(world, outcomes == expected, f"outcomes {outcomes}, expected {expected}")
    check(world, not final, "finish after a quiet step")
    everyone = g.allgather(outcomes)
    check(world, all(o == everyone[0] for o in everyone), "ranks saw different outcomes")


@pytest.mark.parametrize("every", [3, 32])
def test_stop_vote_every_k_steps_agrees_on_every_rank(group, every):
    """Voting every k steps: a standing flag raised on one rank at step t is seen by all ranks
    at the same step, after t and at most 2k steps later."""
    world, g = group
    vote = g.stop_vote(every=every)
    t = 4
    outcomes = [vote.poll(g.rank == g.size - 1 and s >= t) for s in range(t + 2 * every + 1)]
    everyone = g.allgather(outcomes)
    check(world, all(o == everyone[0] for o in everyone), "ranks saw different outcomes")
    first = outcomes.index(True) if True in outcomes else None
    check(world, first is not None and t < first <= t + 2 * every, f"first stop at {first}")
    check(world, vote.finish(g.rank == g.size - 1), "finish sees the standing flag")


def test_stop_vote_finish(group):
    world, g = group
    vote = g.stop_vote(every=1)
    check(world, vote.finish(g.rank == g.size - 1), "finish sees a flag raised now")
    check(world, not vote.poll(False), "a new round starts clean after finish")
    pending = vote.poll(g.rank == 0)                   # raised, not yet seen
    check(world, not pending and vote.finish(False), "finish completes the pending vote")
    vote = g.stop_vote()
    check(world, not vote.finish(False), "nobody raised")
