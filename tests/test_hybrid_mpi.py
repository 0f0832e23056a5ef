"""Hybrid parallelism: one data-parallel group per subdomain (run with
``mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests/test_hybrid_mpi.py``).

With P ranks the tests use S = P / 2 subdomains (vertical strips of the 8x8 scikit-learn
digits): 4 ranks -> 2 subdomains of 2 replicas, 2 ranks -> 1 subdomain of 2 replicas.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all, digits_arrays

from ddmpi.models.coherent import max_replica_difference, module_vector
from ddmpi.parallel.hybrid import (HybridError, dp_step, form_groups, gather_leader_decisions,
                          group_predict, shard_indices, train_data_parallel)
from ddmpi.models.cnn import build_cnn
from ddmpi.parallel.torch_dist import new_group_from_comm, torch_distributed

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]


@pytest.fixture
def comm():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.size % 2:
        pytest.skip("needs an even number of ranks")      # same decision on every rank
    return comm


def strips(num_subdomains, start, stop):
    """Subimages of subdomain s (vertical strip s of width 8/S) of digits[start:stop]."""
    images, labels = digits_arrays()
    width = 8 // num_subdomains
    subs = [torch.from_numpy(np.ascontiguousarray(
        images[start:stop, :, :, s * width:(s + 1) * width])) for s in range(num_subdomains)]
    return subs, torch.from_numpy(labels[start:stop])


def make_cnn(sub_width, seed, batchnorm=True):
    torch.manual_seed(seed)
    return build_cnn("vgg", 2, 1, 10, (8, sub_width), depth=2, width=4, batchnorm=batchnorm)


def test_groups_and_leaders(comm):
    s_total = comm.size // 2
    g = form_groups(comm, s_total)
    assert_all(comm, g.subdomain == comm.rank // 2, f"subdomain {g.subdomain}")
    assert_all(comm, (g.group_size, g.group_rank, g.replicas) == (2, comm.rank % 2, 2),
               f"group size/rank {g.group_size}/{g.group_rank}")
    members = g.group_comm.allgather(comm.rank)
    assert_all(comm, members == [2 * g.subdomain, 2 * g.subdomain + 1], f"members {members}")
    expected_leaders = tuple(range(0, comm.size, 2))
    assert_all(comm, g.leaders == expected_leaders, f"leaders {g.leaders}")
    assert_all(comm, g.is_leader == (comm.rank in expected_leaders), "is_leader")
    if g.is_leader:
        ok = (g.leader_comm.size == s_total and g.leader_comm.rank == g.subdomain
              and g.leader_comm.allgather(comm.rank) == list(expected_leaders))
    else:
        ok = g.leader_comm is None
    assert_all(comm, ok, "leaders' communicator")

    one = form_groups(comm, comm.size)             # P == S: groups of one, all leaders
    assert_all(comm, one.group_size == 1 and one.is_leader and one.subdomain == comm.rank,
               "P == S layout")


def test_p_not_a_multiple_of_s_is_a_clear_error(comm):
    pattern = rf"\({comm.size}\) to be a multiple .*\({comm.size + 1}\)"
    with pytest.raises(HybridError, match=pattern):
        form_groups(comm, comm.size + 1)
    with pytest.raises(HybridError, match="multiple"):
        form_groups(comm, 3 if comm.size % 3 else 5)


@pytest.mark.parametrize("reduction", ["mpi", "torch"])
def test_replicas_stay_identical_while_training(comm, reduction):
    s_total = comm.size // 2
    g = form_groups(comm, s_total)
    subs, labels = strips(s_total, 0, 300)
    val, val_labels = strips(s_total, 300, 400)
    # Different initial weights per rank: training must start from the leader's copy.
    model = make_cnn(8 // s_total, seed=comm.rank)
    context = torch_distributed(comm) if reduction == "torch" else None
    try:
        if context is not None:
            context.__enter__()
            torch_group = new_group_from_comm(comm, g.group_comm)
        else:
            torch_group = None
        hist = train_data_parallel(model, subs[g.subdomain], labels, g, epochs=2,
                                   batch_size=25, lr=1e-2, seed=3,
                                   val=(val[g.subdomain], val_labels),
                                   torch_group=torch_group)
    finally:
        if context is not None:
            context.__exit__(None, None, None)
    diff = max_replica_difference(g.group_comm, model)          # parameters and BN buffers
    assert_all(comm, diff == 0.0, f"replicas differ by {diff} after training")
    hists = g.group_comm.allgather({k: v for k, v in hist.items() if k != "seconds"})
    assert_all(comm, hists[0] == hists[1], "history differs within a group")
    assert_all(comm, hist["train_loss"][-1] < hist["train_loss"][0], hist["train_loss"])
    # The replicas trained: they moved away from the leader's initial weights.
    start = module_vector(make_cnn(8 // s_total, seed=g.leaders[g.subdomain]))
    assert_all(comm, not np.array_equal(module_vector(model), start), "no training happened")


def test_data_parallel_steps_equal_one_large_batch(comm):
    """Without BatchNorm, R replicas with batch b take the steps of one model with batch R*b."""
    s_total = comm.size // 2
    g = form_groups(comm, s_total)
    subs, labels = strips(s_total, 0, 200)
    x = subs[g.subdomain]
    model = make_cnn(8 // s_total, seed=5, batchnorm=False)
    ref = make_cnn(8 // s_total, seed=5, batchnorm=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    shards = [shard_indices(len(labels), r, g.group_size, 9, 0) for r in range(g.group_size)]
    mine = shards[g.group_rank]
    batch = 20
    for start in range(0, 5 * batch, batch):
        idx = torch.from_numpy(mine[start:start + batch])
        dp_step(model, opt, x[idx], labels[idx], g.group_comm)
        union = torch.from_numpy(np.concatenate([s[start:start + batch] for s in shards]))
        ref_opt.zero_grad()
        F.cross_entropy(ref(x[union]), labels[union]).backward()
        ref_opt.step()
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    assert_all(comm, diff < 1e-5, f"data-parallel vs large batch differ by {diff:.3g}")


def test_decisions_reach_the_leaders_and_world_rank_0(comm):
    s_total = comm.size // 2
    g = form_groups(comm, s_total)
    subs, _ = strips(s_total, 0, 101)                # odd N: uneven shares in the group
    model = make_cnn(8 // s_total, seed=20 + g.subdomain).eval()
    probs = group_predict(model, subs[g.subdomain], g, batch_size=16)
    with torch.no_grad():
        expected = torch.softmax(model(subs[g.subdomain]), 1).numpy()
    if g.is_leader:
        ok = probs.shape == (101, 10) and np.allclose(probs, expected, atol=1e-6)
    else:
        ok = probs is None
    assert_all(comm, ok, "group_predict result on the leader")
    gathered = gather_leader_decisions(g, probs)
    everyone = comm.allgather(expected if g.is_leader else None)
    if comm.rank == 0:
        ok = gathered.shape == (s_total, 101, 10) and all(
            np.allclose(gathered[s], everyone[g.leaders[s]], atol=1e-6) for s in range(s_total))
    else:
        ok = gathered is None
    assert_all(comm, ok, "decisions gathered on world rank 0 in subdomain order")
