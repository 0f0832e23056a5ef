"""Hybrid parallelism helpers in one process (``MPI.COMM_SELF``; safe under any launch)."""

import numpy as np
import pytest

from ddmpi.parallel.hybrid import HybridError, form_groups, shard_indices


def test_shards_cover_all_samples_equally():
    n, size = 103, 4
    shards = [shard_indices(n, r, size, seed=1, epoch=2) for r in range(size)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 26
    assert set(np.concatenate(shards)) == set(range(n))
    assert np.array_equal(shards[1], shard_indices(n, 1, size, seed=1, epoch=2))
    assert not np.array_equal(shards[1], shard_indices(n, 1, size, seed=1, epoch=3))
    plain = shard_indices(10, 0, 2, seed=0, epoch=0, shuffle=False)
    assert plain.tolist() == [0, 2, 4, 6, 8]


def test_form_groups_single_process():
    from mpi4py import MPI

    g = form_groups(MPI.COMM_SELF, 1)
    assert (g.subdomain, g.group_size, g.is_leader, g.leaders) == (0, 1, True, (0,))
    assert g.leader_comm is not None and g.leader_comm.size == 1
    with pytest.raises(HybridError, match="assign_subdomains"):
        form_groups(MPI.COMM_SELF, 2)
    with pytest.raises(HybridError, match="at least one"):
        form_groups(MPI.COMM_SELF, 0)
