"""A group of MPI ranks and every collective ddmpi uses (DistDL's partition, in spirit).

The rest of ddmpi never sees a communicator: it holds :class:`Group` objects. A rank outside a
group holds the group with ``active`` False; collectives must only be called on active groups.
Tensors travel as raw host buffers (never pickled); small Python values as objects.
"""

import math

import numpy as np
import torch
from mpi4py import MPI

_MPI_TYPES = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}


def _mpi_type(array):
    try:
        return _MPI_TYPES[array.dtype]
    except KeyError:
        raise TypeError(f"only float32/float64 buffers are communicated, got {array.dtype}") \
            from None


class Group:
    """Ranks sharing a communicator; ``active`` is False on ranks outside the group."""

    def __init__(self, comm):
        self.comm = comm  # for ddmpi.parallel's own modules only
        self.active = comm != MPI.COMM_NULL
        self.rank = comm.Get_rank() if self.active else -1
        self.size = comm.Get_size() if self.active else 0

    @classmethod
    def world(cls):
        return cls(MPI.COMM_WORLD)

    @classmethod
    def single(cls):
        """A group of this process alone (serial runs, tests)."""
        return cls(MPI.COMM_SELF)

    def __repr__(self):
        return f"Group(rank {self.rank} of {self.size})" if self.active else "Group(inactive)"

    @property
    def is_root(self):
        return self.active and self.rank == 0

    def split(self, color, key=None):
        """Collective: the sub-group of ranks with the same ``color`` (None: not a member)."""
        color = MPI.UNDEFINED if color is None else color
        return Group(self.comm.Split(color, self.rank if key is None else key))

    def duplicate(self):
        return Group(self.comm.Dup())

    def free(self):
        if self.active and self.comm not in (MPI.COMM_WORLD, MPI.COMM_SELF):
            self.comm.Free()
        self.active = False

    # ---------------------------------------------------------------- objects
    def barrier(self):
        self.comm.Barrier()

    def bcast(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def gather(self, obj, root=0):
        return self.comm.gather(obj, root=root)

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def sum(self, values):
        """Element-wise float64 sum of a sequence of numbers over the group."""
        return self.comm.allreduce(np.asarray(values, dtype=np.float64), op=MPI.SUM)

    def all(self, flag):
        return bool(self.comm.allreduce(int(bool(flag)), op=MPI.MIN))

    def any(self, flag):
        return bool(self.comm.allreduce(int(bool(flag)), op=MPI.MAX))

    def max(self, value):
        return self.comm.allreduce(value, op=MPI.MAX)

    # ---------------------------------------------------------------- tensors
    def allreduce_mean(self, tensors):
        """Replace every tensor by its mean over the group (one flat host buffer)."""
        tensors = list(tensors)
        if self.size == 1 or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to("cpu") for t in tensors]).numpy().copy()
        self.comm.Allreduce(MPI.IN_PLACE, [flat, _mpi_type(flat)], op=MPI.SUM)
        flat /= self.size
        offset = 0
        for t in tensors:
            t.copy_(torch.from_numpy(flat[offset:offset + t.numel()]).view_as(t))
            offset += t.numel()

    @torch.no_grad()
    def mean_gradients(self, module):
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.allreduce_mean([p.grad for p in params])

    @torch.no_grad()
    def mean_buffers(self, module):
        """Floating buffers (BatchNorm statistics) -> their mean over the group."""
        self.allreduce_mean([b for b in module.buffers() if b.is_floating_point()])

    @torch.no_grad()
    def broadcast_module(self, module, root=0):
        """Overwrite every rank's parameters and buffers with ``root``'s."""
        for t in list(module.parameters()) + list(module.buffers()):
            host = t.detach().to("cpu").contiguous().numpy().copy()
            self.comm.Bcast(host, root=root)
            t.copy_(torch.from_numpy(host).to(t.device))

    def max_difference(self, module, root=0):
        """Max |difference| of this module's parameters and buffers from ``root``'s copy."""
        parts = [t.detach().reshape(-1).to("cpu", torch.float64)
                 for t in list(module.parameters()) + list(module.buffers())
                 if t.is_floating_point()]
        mine = torch.cat(parts).numpy() if parts else np.zeros(0)
        if len(set(self.comm.allgather(mine.size))) != 1:
            return math.inf
        ref = mine.copy() if self.rank == root else np.empty_like(mine)
        self.comm.Bcast([ref, MPI.DOUBLE], root=root)
        return self.comm.allreduce(float(np.max(np.abs(mine - ref), initial=0.0)), op=MPI.MAX)

    def allgatherv(self, array, counts):
        """Concatenation over the ranks of ``array`` (first axis); ``counts``: rows per rank."""
        array = np.ascontiguousarray(array)
        row = int(np.prod(array.shape[1:]))
        sizes = [c * row for c in counts]
        recv = np.empty((sum(counts),) + array.shape[1:], array.dtype)
        mtype = _mpi_type(array)
        self.comm.Allgatherv([array, mtype], [recv, sizes, _displacements(sizes), mtype])
        return recv

    def row_share(self, n):
        """This rank's contiguous share of ``n`` rows, as a slice; the shares of ranks 0, 1, ...
        follow each other, so :meth:`gatherv_rows` puts them back in order."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def gatherv_rows(self, array, root=0):
        """Concatenation of every rank's (n_r, K) float32 rows on ``root`` (None elsewhere)."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        counts = self.comm.allgather(array.size)
        recv = None
        if self.rank == root:
            out = np.empty(sum(counts), np.float32)
            recv = [out, counts, _displacements(counts), MPI.FLOAT]
        self.comm.Gatherv([array, MPI.FLOAT], recv, root=root)
        return recv[0].reshape(-1, *array.shape[1:]) if recv else None

    def gather_decisions(self, local, num_subdomains, chunk_bytes=64 << 20):
        """``{subdomain: (N, K)}`` of every rank -> (S, N, K) on rank 0 (None elsewhere).

        Chunked over samples so that rank 0's receive buffer stays within ``chunk_bytes``.
        """
        owned = sorted(local)
        shapes = {np.shape(local[s]) for s in owned}
        mixed = (f"rank {self.rank}: local decisions of different shapes {sorted(shapes)}"
                 if len(shapes) > 1 else None)
        meta = self.comm.allgather((owned, None if mixed or not shapes else shapes.pop(), mixed))
        errors = [m for _, _, m in meta if m]
        if errors:  # raised on every rank, so none is left waiting in the Gatherv
            raise ValueError("; ".join(errors))
        meta = [(subs, shape) for subs, shape, _ in meta]
        n, k = _common_shape(meta)
        order = [s for subs, _ in meta for s in subs]
        if sorted(order) != list(range(num_subdomains)):
            raise ValueError(f"subdomains owned by the ranks {order} are not exactly "
                             f"0..{num_subdomains - 1}")
        send = (np.stack([np.asarray(local[s], dtype=np.float32) for s in owned])
                if owned else np.empty((0, n, k), np.float32))
        counts = [len(subs) for subs, _ in meta]
        rows = max(1, min(n, chunk_bytes // (4 * k * num_subdomains)))
        result = np.empty((num_subdomains, n, k), np.float32) if self.rank == 0 else None
        buffer = np.empty(num_subdomains * rows * k, np.float32) if self.rank == 0 else None
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            recv = None
            if self.rank == 0:
                chunk = buffer[:num_subdomains * (stop - start) * k].reshape(
                    num_subdomains, stop - start, k)
                sizes = [c * (stop - start) * k for c in counts]
                recv = [chunk, sizes, _displacements(sizes), MPI.FLOAT]
            self.comm.Gatherv([np.ascontiguousarray(send[:, start:stop]), MPI.FLOAT], recv,
                              root=0)
            if self.rank == 0:
                result[order, start:stop] = chunk
        return result

    def stop_vote(self, every=32):
        """A non-blocking vote on stopping, polled every training step, held every ``every``."""
        return StopVote(self, every)


class StopVote:
    """Every ``every``-th :meth:`poll` completes the previous vote (the same outcome on all
    ranks) and starts the next one: no step waits on a blocking collective, and most steps
    communicate nothing."""

    def __init__(self, group, every=32):
        self.group, self.every = group, every
        self.calls = 0
        self.request = None
        self.send = np.zeros(1, np.int32)
        self.recv = np.zeros(1, np.int32)

    def poll(self, flag):
        self.calls += 1
        if self.calls % self.every:
            return False
        outcome = False
        if self.request is not None:
            self.request.Wait()
            outcome = bool(self.recv[0])
        self.send[0] = int(bool(flag))
        self.request = self.group.comm.Iallreduce(self.send, self.recv, op=MPI.MAX)
        return outcome

    def finish(self, flag):
        """Blocking vote at the end of an epoch (completes a pending one first)."""
        pending = False
        if self.request is not None:
            self.request.Wait()
            pending = bool(self.recv[0])
        self.request, self.calls = None, 0
        return pending or self.group.any(flag)


def _displacements(sizes):
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()


def _common_shape(meta):
    shapes = {shape for _, shape in meta if shape is not None}
    if len(shapes) != 1:
        raise ValueError(f"ranks hold local decisions of different shapes: {sorted(shapes)}")
    return shapes.pop()
