"""Gather of local decisions: rank 0 gets exactly every rank's decisions, in subdomain order."""

import numpy as np
import pytest
from helpers import assert_all
from mpi4py import MPI

from ddmpi.parallel.gather import gather_decisions
from ddmpi.parallel.mapping import assign_subdomains


def _decisions(sub, n, k):
    """Values that identify (subdomain, sample, class) exactly in float32."""
    return (sub * 1000 + np.arange(n)[:, None] + np.arange(k)[None, :] / 100).astype(np.float32)


def _communicators():
    world = MPI.COMM_WORLD
    half = world.Split(world.rank % 2, world.rank)
    return {"world": world, "half": half}


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("comm_name", ["world", "half"])
@pytest.mark.parametrize("subs_per_rank", [1, 2, 3])
@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_rank0_gets_every_decision_in_subdomain_order(comm_name, subs_per_rank, chunk_bytes):
    comm = _communicators()[comm_name]
    num_subdomains = subs_per_rank * comm.size
    owned = assign_subdomains(num_subdomains, comm.size)[comm.rank]
    n, k = 37, 5
    local = {sub: _decisions(sub, n, k) for sub in owned}
    result = gather_decisions(comm, local, num_subdomains, chunk_bytes=chunk_bytes)
    if comm.rank == 0:
        expected = np.stack([_decisions(s, n, k) for s in range(num_subdomains)])
        ok = result is not None and np.array_equal(result, expected)
    else:
        ok = result is None
    assert_all(comm, ok, "gathered decisions differ from the ranks' own")


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_shape_mismatch_is_an_error_on_every_rank():
    comm = MPI.COMM_WORLD
    n = 10 if comm.rank == 0 else 11
    with pytest.raises(ValueError, match="different shapes"):
        gather_decisions(comm, {comm.rank: np.zeros((n, 3), np.float32)}, comm.size)
