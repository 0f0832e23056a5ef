"""Hybrid parallelism: more ranks than subdomains, one data-parallel group per subdomain.

With P ranks and S subdomains, P a multiple of S, the ranks split into S groups of R = P / S
consecutive ranks: ranks ``s*R .. s*R + R-1`` form the group of subdomain s (consecutive, so a
group tends to share a node and its fast links). Each group trains the one local CNN of its
subdomain data-parallel: every member holds a replica, takes its own shard of the training
samples, and the replicas' gradients are averaged over the group before each identical optimizer
step, so the replicas stay identical. The group leaders (group rank 0, world ranks 0, R, 2R, ...)
form the leaders' communicator, over which the local decisions travel to the coarse DNN (world
rank 0 == leader of subdomain 0 == leaders' rank 0; leaders' rank == subdomain).

Who owns what
-------------
* ``comm`` (the parent, usually ``MPI.COMM_WORLD``): only used to form the groups.
* ``group_comm`` (one per subdomain, ``comm.Split(color=subdomain, key=rank)``): owns the
  replicas of one local CNN, the gradient/buffer averaging and the sample shards; group rank 0
  is the leader and holds the group's results (decisions, history).
* ``leader_comm`` (``comm.Split`` of the leaders, key=subdomain; None on non-leaders): owns the
  exchange of the S local decisions between subdomains.

Gradient averaging: by default plain ``Allreduce`` of one flat host buffer over ``group_comm``
(mpi4py), chosen because it behaves the same on CPU and GPU tensors (staged through host
memory), needs no torch.distributed group (no TCP rendezvous, no per-group NCCL communicators,
no "every rank creates every group in the same order" rule), and gives bitwise-identical sums on
all members, so replicas stay bitwise identical. On GPUs a torch subgroup can do the same
reduction without the host copy: pass ``torch_group=`` (from
:func:`ddmpi.parallel.torch_dist.new_group_from_comm`, gloo or NCCL); torch's
``DistributedDataParallel(model, process_group=torch_group)`` is the overlapping alternative.

Floating buffers (BatchNorm running statistics) are averaged over the group after every step
(DDP instead copies rank 0's), so the replicas stay identical in every state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ddmpi.models.coherent import _mpi_type, allreduce_mean_grads, broadcast_module
from ddmpi.config import OptimizerConfig
from ddmpi.training.loop import make_optimizer


class HybridError(ValueError):
    """The number of ranks does not fit hybrid parallelism over the subdomains."""


@dataclass
class HybridGroups:
    """This rank's place in the hybrid layout (see module docstring for who owns what)."""

    subdomain: int
    group_comm: Any
    leader_comm: Optional[Any]
    is_leader: bool
    num_subdomains: int
    replicas: int
    leaders: Tuple[int, ...]
    comm: Any

    @property
    def group_rank(self):
        return self.group_comm.rank

    @property
    def group_size(self):
        return self.group_comm.size


def form_groups(comm, num_subdomains) -> HybridGroups:
    """Collective over ``comm``: split the P ranks into S groups of P/S consecutive ranks.

    Raises :class:`HybridError` (on every rank, before any communication) when P is not a
    multiple of S.
    """
    from mpi4py import MPI

    size, s_total = comm.size, int(num_subdomains)
    if s_total < 1:
        raise HybridError(f"need at least one subdomain, got {num_subdomains}")
    if size % s_total:
        hint = (" (fewer ranks than subdomains: use the model-parallel layout of "
                "ddmpi.parallel.mapping.assign_subdomains instead)" if size < s_total else "")
        raise HybridError(f"hybrid parallelism needs the number of MPI ranks ({size}) to be a "
                          f"multiple of the number of subdomains ({s_total}){hint}")
    replicas = size // s_total
    subdomain = comm.rank // replicas
    group_comm = comm.Split(color=subdomain, key=comm.rank)
    is_leader = group_comm.rank == 0
    leader_comm = comm.Split(color=0 if is_leader else MPI.UNDEFINED, key=subdomain)
    if leader_comm == MPI.COMM_NULL:
        leader_comm = None
    leaders = tuple(s * replicas for s in range(s_total))
    return HybridGroups(subdomain, group_comm, leader_comm, is_leader, s_total, replicas,
                        leaders, comm)


def shard_indices(num_samples, group_rank, group_size, seed, epoch, shuffle=True):
    """This replica's sample indices for ``epoch`` (like torch's DistributedSampler).

    All members draw the same permutation (seed, epoch), pad it by wrapping around to a
    multiple of ``group_size`` and take every ``group_size``-th index from ``group_rank`` on,
    so every member gets the same number of samples (and of steps).
    """
    order = (np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)
             if shuffle else np.arange(num_samples))
    per = math.ceil(num_samples / group_size) if num_samples else 0
    if per * group_size > num_samples:
        order = np.resize(order, per * group_size)  # wraps around
    return order[group_rank::group_size]


def _torch_allreduce_mean(tensors, torch_group):
    import torch.distributed as dist

    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=torch_group)
    flat /= dist.get_world_size(torch_group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def average_gradients(model, group_comm, torch_group=None):
    """Collective over the group: replace every ``.grad`` with its mean over the group."""
    if torch_group is None:
        allreduce_mean_grads(group_comm, model.parameters())
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _torch_allreduce_mean([p.grad for p in params], torch_group)


@torch.no_grad()
def average_buffers(model, group_comm, torch_group=None):
    """Collective over the group: floating buffers (BatchNorm statistics) -> group mean."""
    from mpi4py import MPI

    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers or group_comm.size == 1:
        return
    if torch_group is not None:
        _torch_allreduce_mean(buffers, torch_group)
        return
    flat = torch.cat([b.reshape(-1).to("cpu") for b in buffers]).numpy().copy()
    group_comm.Allreduce(MPI.IN_PLACE, [flat, _mpi_type(flat.dtype)], op=MPI.SUM)
    flat /= group_comm.size
    offset = 0
    for b in buffers:
        b.copy_(torch.from_numpy(flat[offset:offset + b.numel()]).view_as(b))
        offset += b.numel()


def dp_step(model, optimizer, x, y, group_comm, loss_fn=F.cross_entropy, torch_group=None):
    """One data-parallel step of one replica: forward/backward on this member's batch,
    gradients averaged over the group, optimizer step, buffers averaged. Collective over the
    group (every member must call it once per step). Returns this member's (loss, correct)."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = loss_fn(logits, y)
    loss.backward()
    average_gradients(model, group_comm, torch_group)
    optimizer.step()
    average_buffers(model, group_comm, torch_group)
    return loss.item(), int((logits.argmax(1) == y).sum())


@torch.no_grad()
def group_predict(model, inputs, groups: HybridGroups, batch_size=256, device="cpu"):
    """Softmax probabilities (N, K) of the group's local CNN on all ``inputs``, computed in
    contiguous shares by the members and gathered (Gatherv) to the group leader. Returns the
    float32 numpy array on the leader, None on the other members. Collective over the group."""
    gc = groups.group_comm
    x = torch.as_tensor(inputs)
    n = len(x)
    lo, hi = gc.rank * n // gc.size, (gc.rank + 1) * n // gc.size
    was_training = model.training
    model.eval()
    parts = [torch.softmax(model(x[i:min(i + batch_size, hi)].to(device)), 1).float().cpu()
             for i in range(lo, hi, batch_size)]
    model.train(was_training)
    mine = torch.cat(parts).numpy() if parts else None
    k = gc.bcast(mine.shape[1] if mine is not None else None, root=gc.size - 1)
    mine = np.ascontiguousarray(mine if mine is not None else np.zeros((0, k), np.float32))
    counts = [((r + 1) * n // gc.size - r * n // gc.size) * k for r in range(gc.size)]
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    recv = np.empty((n, k), np.float32) if gc.rank == 0 else None
    from mpi4py import MPI

    gc.Gatherv([mine, MPI.FLOAT], [recv, counts, displs, MPI.FLOAT] if gc.rank == 0 else None,
               root=0)
    return recv


def gather_leader_decisions(groups: HybridGroups, probs):
    """Leaders' decisions (N, K) -> (S, N, K) in subdomain order on world rank 0 (leader of
    subdomain 0); None elsewhere. Collective over ``leader_comm`` (non-leaders return None)."""
    from mpi4py import MPI

    if not groups.is_leader:
        return None
    lc = groups.leader_comm
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    shapes = lc.allgather(probs.shape)
    if len(set(shapes)) != 1:
        raise HybridError(f"leaders hold decisions of different shapes {shapes}")
    recv = np.empty((lc.size,) + probs.shape, np.float32) if lc.rank == 0 else None
    lc.Gather([probs, MPI.FLOAT], [recv, MPI.FLOAT] if lc.rank == 0 else None, root=0)
    return recv


def train_data_parallel(model, inputs, labels, groups: HybridGroups, *, epochs=10,
                        batch_size=64, lr=1e-3, optimizer="adam", weight_decay=0.0,
                        momentum=0.9, seed=0, device="cpu", val=None, torch_group=None,
                        log: Optional[Callable[[str], None]] = None):
    """Train the group's local CNN data-parallel; collective over ``groups.group_comm``.

    ``inputs`` (N, C, *sub_shape) are the subimages of subdomain ``groups.subdomain`` (every
    member may hold all N, only its shard is used; ``labels`` (N,)). ``batch_size`` is per
    replica, so a step sees ``batch_size * group_size`` samples. Shards are drawn from
    ``seed + subdomain`` (the project's seeding rule). The leader's parameters and buffers are
    broadcast first. ``val``: (inputs, labels), evaluated with :func:`group_predict`.
    Returns the history (the same on every member): lists ``epoch, train_loss, train_acc,
    val_acc, seconds``.
    """
    from mpi4py import MPI

    gc = groups.group_comm
    device = torch.device(device)
    model.to(device)
    broadcast_module(gc, model, root=0)
    opt = make_optimizer(model.parameters(), OptimizerConfig(optimizer, lr, weight_decay, momentum))
    x_all, y_all = torch.as_tensor(inputs), torch.as_tensor(labels).long()
    n = len(y_all)
    say = log or (lambda msg: None)
    history = {k: [] for k in ("epoch", "train_loss", "train_acc", "val_acc", "seconds")}
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        shard = torch.from_numpy(shard_indices(n, gc.rank, gc.size, seed + groups.subdomain,
                                               epoch))
        loss_sum, correct = 0.0, 0
        for start in range(0, len(shard), batch_size):
            idx = shard[start:start + batch_size]
            loss, right = dp_step(model, opt, x_all[idx].to(device), y_all[idx].to(device), gc,
                                  torch_group=torch_group)
            loss_sum += loss * len(idx)
            correct += right
        totals = gc.allreduce(np.array([loss_sum, correct, len(shard)], np.float64), op=MPI.SUM)
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(float(totals[0] / max(totals[2], 1)))
        history["train_acc"].append(float(totals[1] / max(totals[2], 1)))
        va = float("nan")
        if val is not None:
            probs = group_predict(model, val[0], groups, device=device)
            if gc.rank == 0:
                va = float((probs.argmax(1) == np.asarray(val[1])).mean())
            va = gc.bcast(va, root=0)
        history["val_acc"].append(va)
        history["seconds"].append(time.perf_counter() - t0)
        say(f"subdomain {groups.subdomain} data-parallel epoch {epoch + 1}/{epochs}: "
            f"loss {history['train_loss'][-1]:.4f} acc {history['train_acc'][-1]:.4f} "
            f"val acc {va:.4f}")
    return history


class GroupDataParallel:
    """Data parallelism of one model over ``group_comm``, as :func:`ddmpi.training.loop.train_local`
    uses it (``parallel=``): each replica trains on its shard of every epoch's sample order with
    ``ceil(batch_size / group size)`` samples per step, gradients and BatchNorm buffers averaged
    over the group (mpi4py ``Allreduce``, or ``torch_group`` all-reduce), so the replicas stay
    identical and the global batch stays the configured one. Group rank 0 writes checkpoints.

    With ``ddp=True`` the model is wrapped in ``torch.nn.parallel.DistributedDataParallel`` over
    ``torch_group`` instead (gradient all-reduce overlapped with backward): the global
    data-parallel baseline's way.
    """

    def __init__(self, group_comm, torch_group=None, ddp=False):
        if ddp and torch_group is None:
            raise ValueError("ddp=True needs a torch.distributed group (torch_group=)")
        self.comm = group_comm
        self.torch_group = torch_group
        self.ddp = ddp
        self.rank, self.size = group_comm.Get_rank(), group_comm.Get_size()

    @property
    def writes_checkpoints(self):
        return self.rank == 0

    def local_batch_size(self, batch_size):
        return max(1, math.ceil(batch_size / self.size))

    def shard(self, order):
        """This replica's part of ``order`` (a permutation tensor), padded by wrapping around."""
        per = math.ceil(len(order) / self.size)
        if per * self.size > len(order):
            order = order.repeat(2)[:per * self.size]
        return order[self.rank::self.size]

    def wrap(self, model):
        if not self.ddp:
            return model
        return torch.nn.parallel.DistributedDataParallel(model, process_group=self.torch_group)

    def after_backward(self, model):
        if not self.ddp:
            average_gradients(model, self.comm, self.torch_group)

    def after_step(self, model):
        # DDP only broadcasts rank 0's buffers before each forward; averaging them after each
        # step keeps every replica's BatchNorm statistics (and so its evaluation) identical.
        average_buffers(model, self.comm, self.torch_group)

    def sum(self, values):
        """Collective: element-wise sum of a list of numbers over the group."""
        from mpi4py import MPI

        return self.comm.allreduce(np.asarray(values, dtype=np.float64), op=MPI.SUM).tolist()

    def any_stop(self, requested):
        """Collective: stop when any replica was asked to, so all stop at the same batch."""
        from mpi4py import MPI

        return bool(self.comm.allreduce(int(bool(requested)), op=MPI.MAX))
