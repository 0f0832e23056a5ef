"""Node-local rank under a real MPI launch (run with ``mpirun -n 2|4 python -m pytest --with-mpi``).

Everything here runs on one node, so the node-local ranks are the world ranks.
"""

import os

import pytest
import torch
from helpers import assert_all

from ddmpi.parallel.cluster import bind_process, node_local_rank, select_device
from ddmpi.parallel.group import Group

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def test_shared_memory_split_gives_local_ranks_on_this_node(comm):
    local_rank, local_size, source = node_local_rank(comm, environ={})
    assert_all(comm, source == "shared-memory", f"source {source!r}")
    assert_all(comm, local_size == comm.Get_size(), f"local_size {local_size}")
    ranks = comm.allgather(local_rank)
    assert_all(comm, sorted(ranks) == list(range(comm.Get_size())), f"local ranks {ranks}")
    assert_all(comm, local_rank == comm.Get_rank(), "local rank != world rank on one node")


def test_split_agrees_with_open_mpi_local_rank(comm):
    present = comm.allreduce(1 if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ else 0)
    if present != comm.Get_size():
        pytest.skip("not launched by Open MPI's mpirun")     # same decision on every rank
    split = node_local_rank(comm, environ={})
    ompi = node_local_rank(comm)                              # os.environ
    assert_all(comm, ompi[2] == "openmpi", f"source {ompi[2]!r}")
    assert_all(comm, ompi[0] == int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"]), "local rank")
    # Both number the ranks of this node 0..n-1, though not necessarily in the same order
    # (Open MPI 5 maps round-robin over its objects: world 1 may be local 2).
    assert_all(comm, split[1] == ompi[1] == comm.Get_size(), f"sizes {split} vs {ompi}")
    everyone = list(range(comm.Get_size()))
    assert_all(comm, sorted(comm.allgather(split[0])) == everyone, "split local ranks")
    assert_all(comm, sorted(comm.allgather(ompi[0])) == everyone, "openmpi local ranks")


def test_stale_slurm_variables_fall_back_collectively(comm):
    # mpirun inside an sbatch allocation without mpirun's own variables: every rank sees the
    # batch shell's SLURM_PROCID=0. Rank 0 alone would look consistent; all ranks must still
    # agree on the split (a rank deciding alone would hang in Split_type).
    stale = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": str(comm.Get_size()),
             "SLURM_TASKS_PER_NODE": str(comm.Get_size()), "SLURM_JOB_ID": "77"}
    local_rank, local_size, source = node_local_rank(comm, environ=stale)
    assert_all(comm, source == "shared-memory", f"source {source!r}")
    assert_all(comm, (local_rank, local_size) == (comm.Get_rank(), comm.Get_size()), "split")


def test_consistent_slurm_variables_are_used(comm):
    size = comm.Get_size()
    environ = {"SLURM_PROCID": str(comm.Get_rank()), "SLURM_LOCALID": str(comm.Get_rank()),
               "SLURM_STEP_NUM_TASKS": str(size), "SLURM_STEP_TASKS_PER_NODE": str(size)}
    assert_all(comm, node_local_rank(comm, environ) == (comm.Get_rank(), size, "slurm"),
               "srun-style variables not used")


def test_sub_communicator_uses_its_own_split(comm):
    sub = comm.Split(comm.Get_rank() % 2, key=comm.Get_rank())
    try:
        local_rank, local_size, source = node_local_rank(sub)     # world variables don't fit
        assert_all(comm, source == "shared-memory", f"source {source!r}")
        assert_all(comm, (local_rank, local_size) == (sub.Get_rank(), sub.Get_size()), "sub")
    finally:
        sub.Free()


def test_each_rank_gets_its_own_gpu_when_there_are_enough(comm):
    local_rank, local_size, _ = node_local_rank(comm)
    devices = comm.allgather(str(select_device(local_rank, "auto", num_gpus=local_size,
                                               environ={})))
    assert_all(comm, sorted(devices) == sorted({f"cuda:{i}" for i in range(comm.Get_size())}),
               f"devices {devices}")


def test_bind_process_logs_every_rank(comm):
    before = torch.get_num_threads()
    try:
        binding = bind_process(Group.world(), "cpu", "auto",
                               environ={"SLURM_CPUS_PER_TASK": "1"})
        alone = bind_process(None, "cpu", 1, environ={})
    finally:
        torch.set_num_threads(before)
    line = str(binding)
    assert_all(comm, f"rank={comm.Get_rank()}/{comm.Get_size()}" in line, line)
    assert_all(comm, binding.device == torch.device("cpu") and binding.threads == 1, line)
    assert_all(comm, (alone.world_rank, alone.world_size, alone.threads) == (0, 1, 1), str(alone))


def test_bind_process_over_a_sub_group(comm):
    world = Group.world()
    half = world.split(world.rank % 2)
    before = torch.get_num_threads()
    try:
        binding = bind_process(half, "cpu", 1, environ={})
    finally:
        torch.set_num_threads(before)
        half.free()
    assert_all(comm, (binding.world_rank, binding.world_size) == (comm.rank // 2,
               (comm.size - comm.rank % 2 + 1) // 2), str(binding))
