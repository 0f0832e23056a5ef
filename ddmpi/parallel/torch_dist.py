"""A torch.distributed process group built from the running MPI job (no second launcher).

ddmpi is started by ``mpirun``/``srun``; torch.distributed normally wants its own launcher
(``torchrun``) that sets ``MASTER_ADDR``/``RANK``/``WORLD_SIZE``. Here MPI does the rendezvous:
rank 0 of an mpi4py communicator picks an address and a free TCP port, broadcasts them over that
communicator, and every rank calls ``init_process_group(init_method="tcp://ADDR:PORT",
rank=comm.rank, world_size=comm.size)``.

Who owns what
-------------
* ``comm`` (the mpi4py intracommunicator passed to :func:`init_torch_distributed`, usually
  ``MPI.COMM_WORLD``) owns the rendezvous (address/port broadcast) and every exchange of Python
  objects (membership lists when subgroups are made). It stays usable alongside torch.
* The torch *default group* spans exactly the ranks of ``comm``, with torch rank == ``comm.rank``
  and torch world size == ``comm.size``. A process can hold one default group at a time.
* A torch *subgroup* made by :func:`new_group_from_comm` from an MPI sub-communicator
  ``sub_comm`` (a ``comm.Split`` result, say) spans exactly the ranks of ``sub_comm``, and its
  group rank equals ``sub_comm.rank`` (the MPI rank order is kept). Tensors reduced in the torch
  subgroup and buffers reduced in ``sub_comm`` therefore meet the same partners in the same order.

The subgroup rule torch imposes
-------------------------------
``torch.distributed.new_group(ranks)`` must be entered by *every* process of the default group,
members or not, and all processes must create the groups *in the same order*. An MPI
``Split`` instead is called once per rank with that rank's own colour. To bridge the two,
:func:`new_group_from_comm` is collective over ``comm``: each rank contributes the member list
of its own ``sub_comm`` (or nothing, for ``MPI.COMM_NULL``), the lists are all-gathered, and
every rank calls ``new_group`` for every distinct list in one sorted order, keeping the one
that contains it. Callers need only follow the usual MPI rule: every rank of ``comm`` calls
:func:`new_group_from_comm` the same number of times in the same program order.

Backends: ``"gloo"`` for CPU tensors, ``"nccl"`` for CUDA tensors (the CUDA device is set
before initialisation). Master address: ``master_addr`` argument, else the environment variable
``DDMPI_MASTER_ADDR``, else ``127.0.0.1`` when all ranks run on one host, else an address of rank
0's host that is not a loopback. Port: ``master_port``, else ``DDMPI_MASTER_PORT``, else a port
the kernel reports free on rank 0 (probed by binding port 0 then released; another process could
take it in the short window before torch binds it, in which case rank 0 raises and the job aborts
via :mod:`ddmpi.parallel.abort`).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

ENV_ADDR = "DDMPI_MASTER_ADDR"
ENV_PORT = "DDMPI_MASTER_PORT"
DEFAULT_TIMEOUT_S = 600.0


class TorchDistError(RuntimeError):
    """torch.distributed could not be set up from the MPI job."""


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _non_loopback_address(hostname):
    """An IPv4 address of ``hostname`` that is not 127.x, or None."""
    try:
        infos = socket.getaddrinfo(hostname, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        infos = []
    for info in infos:
        addr = info[4][0]
        if not addr.startswith("127."):
            return addr
    return None


def _free_port(addr):
    """A TCP port on ``addr`` that the kernel reports free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1" if addr.startswith("127.") or addr == "localhost" else "", 0))
        return sock.getsockname()[1]


def rendezvous_address(comm, master_addr=None, master_port=None, root=0):
    """Collective over ``comm``: ``(addr, port)`` of the TCP rendezvous, chosen on ``root``.

    ``root`` decides (see the module docstring for the order of preference) and broadcasts over
    ``comm``; an error on ``root`` is broadcast too, so every rank raises instead of waiting.
    """
    from mpi4py import MPI

    hosts = comm.allgather(MPI.Get_processor_name())
    result = None
    if comm.rank == root:
        try:
            addr = master_addr or os.environ.get(ENV_ADDR)
            if not addr:
                if len(set(hosts)) == 1:
                    addr = "127.0.0.1"
                else:
                    addr = _non_loopback_address(socket.gethostname())
                    if addr is None:
                        raise TorchDistError(
                            f"ranks span hosts {sorted(set(hosts))} but no non-loopback address "
                            f"of {socket.gethostname()} was found; set {ENV_ADDR}")
            port = master_port or os.environ.get(ENV_PORT)
            port = int(port) if port else _free_port(addr)
            result = (addr, port)
        except Exception as exc:  # noqa: BLE001 - broadcast so no rank waits forever
            result = exc
    result = comm.bcast(result, root=root)
    if isinstance(result, Exception):
        raise TorchDistError(f"rendezvous address on rank {root} failed: {result}") from None
    return result


@dataclass
class TorchDist:
    """The torch default group built from ``comm``: torch rank == comm.rank (see module doc).

    ``owned`` is False when the default group already existed (it is then left alone at exit).
    """

    comm: Any
    backend: str
    init_method: Optional[str]
    device: torch.device
    owned: bool = True

    @property
    def rank(self):
        return dist.get_rank()

    @property
    def world_size(self):
        return dist.get_world_size()

    def new_group_from_comm(self, sub_comm, timeout_s=None):
        """Torch subgroup with the ranks of ``sub_comm``; collective over ``self.comm``."""
        return new_group_from_comm(self.comm, sub_comm, timeout_s=timeout_s)


def default_backend(device):
    """``"nccl"`` for a CUDA device, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_torch_distributed(comm=None, device="cpu", backend=None, master_addr=None,
                           master_port=None, timeout_s=DEFAULT_TIMEOUT_S):
    """Collective over ``comm``: initialise torch's default group from the MPI communicator.

    Every rank of ``comm`` (default ``MPI.COMM_WORLD``) must call this. Returns a
    :class:`TorchDist`. If a default group already exists it must match ``comm`` (same rank and
    size) and is reused, not re-created (``owned=False``).
    """
    comm = comm if comm is not None else _world()
    device = torch.device(device)
    backend = backend or default_backend(device)
    if dist.is_initialized():
        ok = dist.get_rank() == comm.rank and dist.get_world_size() == comm.size
        if not all(comm.allgather(ok)):
            raise TorchDistError(
                "a torch.distributed default group already exists and does not match the MPI "
                f"communicator (torch rank/size {dist.get_rank()}/{dist.get_world_size()}, "
                f"MPI {comm.rank}/{comm.size})")
        return TorchDist(comm, dist.get_backend(), None, device, owned=False)
    if not all(comm.allgather(dist.is_available())):
        raise TorchDistError("torch.distributed is not available in this torch build")
    if backend == "nccl":
        if device.type != "cuda":
            raise TorchDistError(f"backend 'nccl' needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    addr, port = rendezvous_address(comm, master_addr, master_port)
    init_method = f"tcp://{addr}:{port}"
    kwargs = dict(backend=backend, init_method=init_method, rank=comm.rank,
                  world_size=comm.size, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return TorchDist(comm, backend, init_method, device, owned=True)


def destroy_torch_distributed(td=None):
    """Destroy the default group (and all subgroups) if ``td`` owns it (or ``td`` is None)."""
    if dist.is_initialized() and (td is None or td.owned):
        dist.destroy_process_group()


@contextlib.contextmanager
def torch_distributed(comm=None, device="cpu", backend=None, master_addr=None, master_port=None,
                      timeout_s=DEFAULT_TIMEOUT_S):
    """Context manager: the default group from ``comm`` for the ``with`` block, destroyed after.

    ::

        with torch_distributed(MPI.COMM_WORLD, device="cpu") as td:   # gloo
            x = torch.ones(3); dist.all_reduce(x)
            sub = comm.Split(color=comm.rank % 2, key=comm.rank)
            group = td.new_group_from_comm(sub)          # all ranks call it
            dist.all_reduce(x, group=group)
    """
    td = init_torch_distributed(comm, device, backend, master_addr, master_port, timeout_s)
    try:
        yield td
    finally:
        destroy_torch_distributed(td)


_SORT_RANKS = "sort_ranks" in inspect.signature(dist.new_group).parameters


def new_group_from_comm(comm, sub_comm, timeout_s=None):
    """Collective over ``comm``: the torch subgroup spanning the ranks of ``sub_comm``.

    ``comm`` is the communicator the default group was built from (torch rank == comm.rank).
    Each rank passes its own ``sub_comm`` (e.g. from ``comm.Split``) or ``MPI.COMM_NULL``/None
    when it belongs to none; ``sub_comm`` must be a sub-communicator of ``comm``. Returns the
    torch group containing this rank (group rank == ``sub_comm.rank``), or None for
    ``COMM_NULL``. Every rank of ``comm`` must call this the same number of times in the same
    order, because torch requires all processes to enter every ``new_group`` call in one order
    (this function makes the order: the member lists sorted).
    """
    from mpi4py import MPI

    if not dist.is_initialized():
        raise TorchDistError("new_group_from_comm needs the default group "
                             "(init_torch_distributed / torch_distributed first)")
    if dist.get_rank() != comm.rank or dist.get_world_size() != comm.size:
        raise TorchDistError("comm is not the communicator the torch default group was built from")
    null = sub_comm is None or sub_comm == MPI.COMM_NULL
    members = None if null else tuple(sub_comm.allgather(comm.rank))
    all_members = comm.allgather(members)
    distinct = sorted({m for m in all_members if m is not None})
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    mine = None
    for ranks in distinct:
        if _SORT_RANKS:
            group = dist.new_group(list(ranks), sort_ranks=False, **kwargs)
        else:
            if list(ranks) != sorted(ranks):
                raise TorchDistError(
                    f"sub-communicator ranks {ranks} are not in increasing order of the parent "
                    "rank and this torch sorts group ranks; use key=comm.rank in Split")
            group = dist.new_group(list(ranks), **kwargs)
        if ranks == members:
            mine = group
    if mine is not None and dist.get_rank(mine) != sub_comm.rank:
        raise TorchDistError(f"torch group rank {dist.get_rank(mine)} != MPI sub-communicator "
                             f"rank {sub_comm.rank}")
    return mine
