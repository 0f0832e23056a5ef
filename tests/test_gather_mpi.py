"""Gather of local decisions: rank 0 gets exactly every rank's decisions, in subdomain order
(run with ``mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests/test_gather_mpi.py``)."""

import numpy as np
import pytest
from helpers import assert_all

from ddmpi.parallel.group import Group
from ddmpi.parallel.layout import assign_subdomains

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(60)]


def _decisions(sub, n, k):
    """Values that identify (subdomain, sample, class) exactly in float32."""
    return (sub * 1000 + np.arange(n)[:, None] + np.arange(k)[None, :] / 100).astype(np.float32)


def _group(world, name):
    return world if name == "world" else world.split(world.rank % 2)


def _ownerships(size, subs_per_rank):
    """Every rank owning ``subs_per_rank`` contiguous subdomains, then one rank owning none
    (the others share its part), then ownership in reverse rank order."""
    s_total = subs_per_rank * size
    balanced = assign_subdomains(s_total, size)
    empty_first = [[]] + assign_subdomains(s_total, size - 1) if size > 1 else balanced
    reverse = balanced[::-1]
    return {"balanced": balanced, "rank 0 owns none": empty_first, "reversed": reverse}


@pytest.mark.parametrize("group_name", ["world", "half"])
@pytest.mark.parametrize("subs_per_rank", [1, 2, 3])
@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_rank0_gets_every_decision_in_subdomain_order(group_name, subs_per_rank, chunk_bytes):
    world = Group.world()
    group = _group(world, group_name)
    try:
        n, k = 37, 5
        bad = []
        for label, owned in _ownerships(group.size, subs_per_rank).items():
            s_total = subs_per_rank * group.size
            local = {sub: _decisions(sub, n, k) for sub in owned[group.rank]}
            try:
                result = group.gather_decisions(local, s_total, chunk_bytes=chunk_bytes)
            except Exception as err:  # noqa: BLE001 - reported collectively below
                bad.append(f"{label}: raised {err!r}")
                continue
            if group.rank == 0:
                expected = np.stack([_decisions(s, n, k) for s in range(s_total)])
                if result is None or not np.array_equal(result, expected):
                    bad.append(f"{label}: wrong result")
            elif result is not None:
                bad.append(f"{label}: non-root got a result")
        assert_all(world.comm, not bad, f"gathered decisions differ from the ranks' own: {bad}")
    finally:
        if group is not world:
            group.free()


def test_no_samples_gives_an_empty_result():
    world = Group.world()
    result = world.gather_decisions({world.rank: np.zeros((0, 4), np.float32)}, world.size)
    ok = result.shape == (world.size, 0, 4) if world.rank == 0 else result is None
    assert_all(world.comm, ok, "empty decisions")


def test_shape_mismatch_between_ranks_is_an_error_on_every_rank():
    world = Group.world()
    n = 10 if world.rank == 0 else 11
    with pytest.raises(ValueError, match="different shapes"):
        world.gather_decisions({world.rank: np.zeros((n, 3), np.float32)}, world.size)
    world.barrier()  # every rank got here: nobody was left waiting


def test_shape_mismatch_within_one_rank_is_an_error_on_every_rank():
    world = Group.world()
    s_total = world.size + 1
    owned = assign_subdomains(s_total, world.size)[world.rank]   # rank size-1 owns two
    local = {s: np.zeros((10 + (s == s_total - 1), 3), np.float32) for s in owned}
    with pytest.raises(ValueError, match="different shapes"):
        world.gather_decisions(local, s_total)
    world.barrier()


def test_missing_or_duplicated_subdomains_are_an_error_on_every_rank():
    world = Group.world()
    with pytest.raises(ValueError, match="not exactly"):
        world.gather_decisions({0: np.zeros((4, 3), np.float32)}, world.size)
    world.barrier()
