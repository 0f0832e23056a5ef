"""Data parallelism of one model over a group of ranks: hybrid local CNNs and the global DDP CNN.

Each replica takes its shard of every epoch's sample order; gradients are averaged every step
(mpi4py ``Allreduce``, or torch DDP's overlapped all-reduce); BatchNorm statistics are averaged
once per epoch, before validation, so every replica evaluates identically.
"""

import contextlib
import inspect
import math
import socket

import torch
import torch.distributed as dist

from ddmpi.parallel.torch_dist import torch_distributed


class DataParallel:
    """Replicas of one model on the ranks of ``group``; group rank 0 writes checkpoints."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = group.rank, group.size

    @property
    def writes_checkpoints(self):
        return self.rank == 0

    def local_batch_size(self, batch_size):
        return max(1, math.ceil(batch_size / self.size))

    def shard(self, order):
        """This replica's part of ``order``, padded by wrapping around to equal lengths."""
        per = math.ceil(len(order) / self.size)
        if per * self.size > len(order):
            order = order.repeat(2)[:per * self.size]
        return order[self.rank::self.size]

    def wrap(self, model):
        return model

    def after_backward(self, model):
        self.group.mean_gradients(model)

    def epoch_end(self, model):
        self.group.mean_buffers(model)

    def sum(self, values):
        return self.group.sum(values).tolist()

    def stop_vote(self):
        return self.group.stop_vote()


class DDPDataParallel(DataParallel):
    """Gradients by torch ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU)."""

    def __init__(self, group, torch_group):
        super().__init__(group)
        self.torch_group = torch_group

    def wrap(self, model):
        ddp = torch.nn.parallel.DistributedDataParallel
        off = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
        return ddp(model, process_group=self.torch_group, **off)

    def after_backward(self, model):
        pass  # DDP reduced the gradients during backward


def ddp_backend(group, device):
    """NCCL when every rank has a GPU of its own, else gloo (NCCL refuses shared GPUs)."""
    places = group.allgather((socket.gethostname(), str(device)))
    own = device.type == "cuda" and len(set(places)) == len(places)
    return "nccl" if own else "gloo"


@contextlib.contextmanager
def ddp_over(group, device):
    """A :class:`DDPDataParallel` over ``group`` for the duration of the block."""
    with torch_distributed(group.comm, device, backend=ddp_backend(group, device)):
        yield DDPDataParallel(group, dist.group.WORLD)
