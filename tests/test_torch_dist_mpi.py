"""torch.distributed from the MPI job (run with
``mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests/test_torch_dist_mpi.py``)."""

import pytest
import torch
import torch.distributed as dist
from helpers import assert_all

from ddmpi.parallel.torch_dist import (
    init_torch_distributed,
    new_group_from_comm,
    torch_distributed,
)

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]


@pytest.fixture
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def test_default_group_matches_communicator_and_is_destroyed(comm):
    with torch_distributed(comm) as td:
        assert_all(comm, td.backend == "gloo" and td.init_method.startswith("tcp://"),
                   f"{td.backend} {td.init_method}")
        assert_all(comm, (dist.get_rank(), dist.get_world_size()) == (comm.rank, comm.size),
                   "torch rank/size differ from MPI")
        x = torch.tensor([float(comm.rank)])
        dist.all_reduce(x)
        assert_all(comm, x.item() == sum(range(comm.size)), f"all_reduce gave {x.item()}")
        methods = comm.allgather(td.init_method)
        assert_all(comm, len(set(methods)) == 1, f"init methods {methods}")
    assert_all(comm, not dist.is_initialized(), "default group not destroyed")
    with torch_distributed(comm) as td:          # a second group in the same processes
        y = torch.ones(2)
        dist.all_reduce(y)
        assert_all(comm, torch.equal(y, torch.full((2,), float(comm.size))), str(y))
    assert_all(comm, not dist.is_initialized(), "second group not destroyed")


def test_nested_use_reuses_the_existing_group(comm):
    with torch_distributed(comm) as outer:
        inner = init_torch_distributed(comm)
        assert_all(comm, not inner.owned and outer.owned, "ownership")
        with torch_distributed(comm):
            pass
        assert_all(comm, dist.is_initialized(), "inner context destroyed the outer group")
    assert_all(comm, not dist.is_initialized(), "outer group not destroyed")


def test_subgroups_match_mpi_sub_communicators(comm):
    from mpi4py import MPI

    with torch_distributed(comm):
        # Reverse key: MPI group rank order differs from the world order on purpose.
        sub = comm.Split(color=comm.rank % 2, key=-comm.rank)
        group = new_group_from_comm(comm, sub)
        assert_all(comm, dist.get_rank(group) == sub.rank,
                   f"torch group rank {dist.get_rank(group)} != MPI rank {sub.rank}")
        assert_all(comm, dist.get_world_size(group) == sub.size, "group size")
        x = torch.tensor([float(comm.rank + 1)])
        dist.all_reduce(x, group=group)
        assert_all(comm, x.item() == sub.allreduce(comm.rank + 1), f"group sum {x.item()}")
        # Broadcast from group rank 0 reaches the same root as MPI's Bcast over sub.
        root_world = sub.bcast(comm.rank, root=0)
        y = torch.tensor([float(comm.rank)])
        dist.broadcast(y, group_src=0, group=group)
        assert_all(comm, y.item() == root_world, f"broadcast {y.item()} vs {root_world}")

        # A second split, with COMM_NULL on half of the ranks (like a leaders' communicator).
        leaders = comm.Split(0 if comm.rank % 2 == 0 else MPI.UNDEFINED, comm.rank)
        lgroup = new_group_from_comm(comm, leaders)
        leaders = None if leaders == MPI.COMM_NULL else leaders
        is_leader = comm.rank % 2 == 0
        assert_all(comm, (lgroup is not None) == is_leader and (leaders is not None) == is_leader,
                   "leader group membership")
        if is_leader:
            z = torch.ones(1)
            dist.all_reduce(z, group=lgroup)
            ok = z.item() == leaders.size
        else:
            ok = True
        assert_all(comm, ok, "leaders' all_reduce")
        dist.barrier()


def test_rendezvous_error_on_root_reaches_every_rank(comm, monkeypatch):
    from ddmpi.parallel import torch_dist

    def broken(addr):
        raise OSError("no port for you")

    monkeypatch.setattr(torch_dist, "_free_port", broken)
    monkeypatch.delenv(torch_dist.ENV_PORT, raising=False)
    with pytest.raises(torch_dist.TorchDistError, match="no port for you"):
        torch_dist.rendezvous_address(comm)
    assert_all(comm, not dist.is_initialized(), "group left initialised")
