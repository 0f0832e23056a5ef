"""torch.distributed set-up in one process (``MPI.COMM_SELF``; safe under any launch)."""

import pytest
import torch
import torch.distributed as dist

from ddmpi.parallel import torch_dist
from ddmpi.parallel.torch_dist import (
    TorchDistError,
    default_backend,
    rendezvous_address,
    torch_distributed,
)


@pytest.fixture
def self_comm():
    from mpi4py import MPI

    return MPI.COMM_SELF


def test_default_backend():
    assert default_backend("cpu") == "gloo"
    assert default_backend(torch.device("cuda", 1)) == "nccl"


def test_rendezvous_on_one_host_uses_loopback_and_a_port(self_comm, monkeypatch):
    monkeypatch.delenv(torch_dist.ENV_ADDR, raising=False)
    monkeypatch.delenv(torch_dist.ENV_PORT, raising=False)
    addr, port = rendezvous_address(self_comm)
    assert addr == "127.0.0.1" and 0 < port < 65536
    monkeypatch.setenv(torch_dist.ENV_ADDR, "10.1.2.3")
    monkeypatch.setenv(torch_dist.ENV_PORT, "29999")
    assert rendezvous_address(self_comm) == ("10.1.2.3", 29999)
    assert rendezvous_address(self_comm, "h", 123) == ("h", 123)


def test_single_process_group_round_trip(self_comm, monkeypatch):
    monkeypatch.delenv(torch_dist.ENV_ADDR, raising=False)
    monkeypatch.delenv(torch_dist.ENV_PORT, raising=False)
    if dist.is_initialized():
        pytest.skip("a default group already exists in this process")
    with torch_distributed(self_comm) as td:
        assert (td.rank, td.world_size, td.backend) == (0, 1, "gloo")
        x = torch.arange(3.0)
        dist.all_reduce(x)
        assert torch.equal(x, torch.arange(3.0))
        group = td.new_group_from_comm(self_comm.Dup())
        assert dist.get_world_size(group) == 1
    assert not dist.is_initialized()


def test_nccl_needs_a_cuda_device(self_comm):
    if dist.is_initialized():
        pytest.skip("a default group already exists in this process")
    with pytest.raises(TorchDistError, match="CUDA"):
        torch_dist.init_torch_distributed(self_comm, device="cpu", backend="nccl")
