"""The coherent CNN-DNN: local CNNs and the coarse DNN trained end to end as one model.

In the CNN-DNN of Klawonn, Lanser & Weber (2024) the local CNNs are trained first, each on its
own subdomain, and the coarse DNN is trained afterwards on their frozen decisions. The coherent
variant (arXiv 2408.14442) trains the composition ``coarse(concat_s softmax(CNN_s(x_s)))`` with
one loss, back-propagating through the coarse DNN into every local CNN, while each local CNN
still lives on the rank that owns its subdomain (model parallelism).

Who owns what
-------------
* Rank r owns the local CNNs of its subdomains ``layout.owned`` (any subset of 0..S-1; every
  subdomain owned by exactly one rank) and their subimages; only rank r ever holds their
  parameters, gradients and optimizer state.
* The coarse DNN is *replicated*: every rank holds an identical copy (rank 0's copy is
  broadcast at the start), runs it on identical inputs and takes identical optimizer steps, so
  the copies stay identical without any gradient reduction. :func:`max_replica_difference`
  checks this (``train_coherent`` does at the end of every epoch).
* ``comm`` (mpi4py intracommunicator) carries the only communication: one ``Allgatherv`` of the
  local outputs per forward pass. No torch.distributed group is needed.

One batch, on every rank
------------------------
1. The batch's sample indices come from a permutation drawn from the shared seed, so every rank
   takes the same samples in the same order (each from its own subimages).
2. Each owned CNN s maps its subimages to a local output ``p_s`` of shape (B, K): softmax
   probabilities (``output="probabilities"``, the paper's local decisions, the default) or raw
   logits (``output="logits"``).
3. :class:`GatherDecisions` (an autograd Function) all-gathers the ``p_s`` of all ranks and
   returns them in *subdomain order* 0..S-1, whatever rank owns which; the coarse input is the
   per-sample concatenation ``[p_0 | p_1 | ... | p_{S-1}]`` of shape (B, S*K).
4. Every rank computes the coarse logits and the same loss, and calls ``loss.backward()``.
   The backward of the gather takes rank r's own slices of the incoming gradient
   ``dL/dp_s, s in owned(r)`` and nothing else: no communication. This is exact because every
   rank evaluates the *whole* loss on an identical replica of the coarse DNN with identical
   inputs, so ``dL/d(concat)`` is already complete and identical on every rank, and the part of
   it that concerns ``p_s`` is precisely the gradient CNN s needs. (Were the coarse DNN only on
   rank 0, the backward would instead have to scatter that gradient.)

Randomness (dropout) is made independent of the rank layout: local CNN s draws from its own
random stream seeded ``seed + s`` and the coarse DNN from the stream ``seed + S``
(:class:`RngStream`), so the distributed run reproduces the single-process run exactly and the
coarse replicas draw identical dropout masks.

Usage::

    from mpi4py import MPI
    from ddmpi.parallel.mapping import assign_subdomains
    comm = MPI.COMM_WORLD
    owned = assign_subdomains(S, comm.size)[comm.rank]
    local = {s: build_cnn("vgg", 2, 1, 10, sub_shape) for s in owned}
    coarse = CoarseDNN(S * 10, 10)
    hist = train_coherent(local, coarse, {s: x_train[s] for s in owned}, y_train, comm,
                          val=({s: x_val[s] for s in owned}, y_val), epochs=10, lr=1e-3)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddmpi.config import OptimizerConfig
from ddmpi.training.loop import make_optimizer

OUTPUTS = ("probabilities", "logits")


# --------------------------------------------------------------------------- MPI helpers

def _mpi_type(dtype):
    from mpi4py import MPI

    types = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}
    try:
        return types[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"only float32/float64 tensors are communicated, got {dtype}") from None


def module_vector(module, buffers=True):
    """All parameters (and floating buffers) of ``module`` as one float64 numpy vector."""
    parts = [p.detach().reshape(-1).to("cpu", torch.float64) for p in module.parameters()]
    if buffers:
        parts += [b.detach().reshape(-1).to("cpu", torch.float64)
                  for b in module.buffers() if b.is_floating_point()]
    if not parts:
        return np.zeros(0)
    return torch.cat(parts).numpy()


def max_replica_difference(comm, module, root=0, buffers=True):
    """Collective over ``comm``: max |difference| between this module's copies on all ranks.

    Compares every rank's parameters (and floating buffers) with ``root``'s; returns the same
    float on every rank (0.0 for bitwise-identical replicas).
    """
    from mpi4py import MPI

    mine = module_vector(module, buffers)
    sizes = comm.allgather(mine.size)
    if len(set(sizes)) != 1:
        return math.inf
    ref = mine.copy() if comm.rank == root else np.empty_like(mine)
    comm.Bcast([ref, MPI.DOUBLE], root=root)
    local = float(np.max(np.abs(mine - ref))) if mine.size else 0.0
    return comm.allreduce(local, op=MPI.MAX)


@torch.no_grad()
def broadcast_module(comm, module, root=0):
    """Collective over ``comm``: overwrite every rank's parameters and buffers with ``root``'s."""
    tensors = list(module.parameters()) + list(module.buffers())
    for t in tensors:
        host = t.detach().to("cpu").contiguous().numpy().copy()
        comm.Bcast(host, root=root)
        t.copy_(torch.from_numpy(host).to(t.device))


@torch.no_grad()
def allreduce_mean_grads(comm, parameters):
    """Collective over ``comm``: average the ``.grad`` of ``parameters`` (one flat buffer)."""
    from mpi4py import MPI

    params = [p for p in parameters if p.requires_grad]
    if comm is None or comm.size == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dtype = grads[0].dtype
    flat = torch.cat([g.reshape(-1).to("cpu", dtype) for g in grads]).numpy().copy()
    comm.Allreduce(MPI.IN_PLACE, [flat, _mpi_type(flat.dtype)], op=MPI.SUM)
    flat /= comm.size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        new = torch.from_numpy(flat[offset:offset + n]).view_as(g).to(p.device, p.dtype)
        if p.grad is None:
            p.grad = new
        else:
            p.grad.copy_(new)
        offset += n


# --------------------------------------------------------------------------- layout

class CoherentError(ValueError):
    """Inconsistent subdomain ownership or inputs for the coherent CNN-DNN."""


@dataclass(frozen=True)
class SubdomainLayout:
    """Who owns which subdomain: ``owners[r]`` lists rank r's subdomains (sorted)."""

    num_subdomains: int
    owners: Tuple[Tuple[int, ...], ...]
    rank: int

    @property
    def owned(self):
        return self.owners[self.rank]

    @property
    def gather_order(self):
        """Subdomain of each block of the all-gathered buffer (rank order, then owned order)."""
        return tuple(s for owned in self.owners for s in owned)

    @classmethod
    def from_comm(cls, comm, owned, num_subdomains=None):
        """Collective over ``comm`` (or single process when ``comm`` is None)."""
        owned = tuple(sorted(int(s) for s in owned))
        owners = (owned,) if comm is None else tuple(tuple(o) for o in comm.allgather(owned))
        rank = 0 if comm is None else comm.rank
        every = [s for o in owners for s in o]
        n = len(every) if num_subdomains is None else int(num_subdomains)
        # Every rank sees the same owners, so every rank raises the same error (no hang).
        if sorted(every) != list(range(n)):
            raise CoherentError(
                f"subdomain ownership {list(owners)} must cover 0..{n - 1} exactly once")
        empty = [r for r, o in enumerate(owners) if not o]
        if empty:
            raise CoherentError(
                f"ranks {empty} own no subdomain; run with at most {n} ranks (use "
                "ddmpi.parallel.hybrid for more ranks than subdomains)")
        return cls(n, owners, rank)


# --------------------------------------------------------------------------- gather

class GatherDecisions(torch.autograd.Function):
    """All-gather of local outputs into subdomain order; backward keeps this rank's slices.

    forward(local (n_own, B, K), comm, layout) -> (S, B, K), block s = subdomain s's output.
    backward(grad (S, B, K)) -> grad[layout.owned]: the loss is computed identically on every
    rank (replicated coarse DNN), so the incoming gradient is complete and identical everywhere
    and rank r's slices are exactly the gradients of its own outputs; nothing is reduced.

    Communication: one mpi4py ``Allgatherv`` of host float32/float64 buffers over ``comm``
    (device tensors are copied to host and back; B*S*K numbers per batch is small).
    """

    @staticmethod
    def forward(ctx, local, comm, layout):
        ctx.owned = layout.owned
        n_own, batch, k = local.shape
        if n_own != len(layout.owned):
            raise CoherentError(f"{n_own} local outputs for owned subdomains {layout.owned}")
        order = torch.as_tensor(np.argsort(layout.gather_order), dtype=torch.long)
        if comm is None or comm.size == 1:
            gathered = local.detach()
        else:
            send = local.detach().to("cpu").contiguous().numpy()
            mtype = _mpi_type(send.dtype)
            counts = [len(o) * batch * k for o in layout.owners]
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
            recv = np.empty(sum(counts), dtype=send.dtype)
            comm.Allgatherv([send, mtype], [recv, counts, displs, mtype])
            gathered = torch.from_numpy(recv).view(layout.num_subdomains, batch, k)
            gathered = gathered.to(local.device)
        return gathered[order.to(gathered.device)].clone()

    @staticmethod
    def backward(ctx, grad_full):
        index = torch.as_tensor(ctx.owned, dtype=torch.long, device=grad_full.device)
        return grad_full.index_select(0, index), None, None


def gather_decisions(local, comm, layout):
    """(n_own, B, K) local outputs -> (S, B, K) in subdomain order on every rank (autograd)."""
    return GatherDecisions.apply(local, comm, layout)


# --------------------------------------------------------------------------- randomness

class RngStream:
    """A private random stream: inside ``with stream.active(device)`` torch's global CPU (and
    CUDA) generator continues this stream, and is restored afterwards.

    Gives each local CNN (seed ``seed + s``) and the coarse DNN (seed ``seed + S``) the same
    dropout masks wherever it runs and however many modules ran before it on that rank.
    """

    def __init__(self, seed):
        self.seed = int(seed)
        self._cpu = None
        self._cuda = {}

    @contextlib.contextmanager
    def active(self, device="cpu"):
        device = torch.device(device)
        saved_cpu = torch.get_rng_state()
        if self._cpu is None:
            self._cpu = torch.Generator().manual_seed(self.seed).get_state()
        torch.set_rng_state(self._cpu)
        cuda = device.type == "cuda"
        if cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            saved_cuda = torch.cuda.get_rng_state(index)
            if index not in self._cuda:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(self.seed)
                self._cuda[index] = torch.cuda.get_rng_state(index)
            torch.cuda.set_rng_state(self._cuda[index], index)
        try:
            yield
        finally:
            self._cpu = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if cuda:
                self._cuda[index] = torch.cuda.get_rng_state(index)
                torch.cuda.set_rng_state(saved_cuda, index)


# --------------------------------------------------------------------------- model

class CoherentCNNDNN(nn.Module):
    """This rank's part of the coherent CNN-DNN: its local CNNs plus a coarse DNN replica.

    ``local_models``: {subdomain: CNN} for the subdomains this rank owns (logits (B, K) out).
    ``coarse``: maps (B, S*K) to class logits; replicated, rank 0's copy is broadcast at
    construction so all replicas start identical. Construction is collective over ``comm``
    (None: single process owning all subdomains). ``output``: "probabilities" (softmax of the
    local logits, default) or "logits" is what the coarse DNN sees. ``seed``: if not None, run
    every module in its own :class:`RngStream` (see module docstring).
    """

    def __init__(self, local_models: Mapping[int, nn.Module], coarse: nn.Module, comm=None,
                 num_subdomains=None, output="probabilities", seed: Optional[int] = 0,
                 sync_coarse=True):
        super().__init__()
        if output not in OUTPUTS:
            raise CoherentError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.comm = comm
        self.layout = SubdomainLayout.from_comm(comm, local_models.keys(), num_subdomains)
        self.local = nn.ModuleDict({str(s): local_models[s] for s in self.layout.owned})
        self.coarse = coarse
        self.output = output
        self.seed = seed
        s_total = self.layout.num_subdomains
        self._streams = None
        if seed is not None:
            self._streams = {s: RngStream(seed + s) for s in self.layout.owned}
            self._streams["coarse"] = RngStream(seed + s_total)
        if sync_coarse and comm is not None and comm.size > 1:
            broadcast_module(comm, self.coarse)

    @property
    def owned(self):
        return self.layout.owned

    def _stream(self, key, device):
        if self._streams is None:
            return contextlib.nullcontext()
        return self._streams[key].active(device)

    def local_outputs(self, inputs: Mapping[int, torch.Tensor]):
        """(n_own, B, K): the owned CNNs' outputs (probabilities or logits) in owned order."""
        outs = []
        for s in self.layout.owned:
            x = inputs[s]
            with self._stream(s, x.device):
                logits = self.local[str(s)](x)
            outs.append(torch.softmax(logits, dim=1) if self.output == "probabilities" else logits)
        return torch.stack(outs)

    def forward(self, inputs: Mapping[int, torch.Tensor]):
        """Class logits (B, classes), identical on every rank. Collective over ``comm``."""
        local = self.local_outputs(inputs)
        full = gather_decisions(local, self.comm, self.layout)          # (S, B, K)
        s_total, batch, k = full.shape
        coarse_in = full.permute(1, 0, 2).reshape(batch, s_total * k)  # [p_0 | ... | p_S-1]
        with self._stream("coarse", coarse_in.device):
            return self.coarse(coarse_in)


# --------------------------------------------------------------------------- training

def _as_tensor(x, dtype=None):
    t = torch.as_tensor(x)
    return t if dtype is None else t.to(dtype)


def _batch(inputs, owned, idx, device):
    return {s: _as_tensor(inputs[s])[idx].to(device) for s in owned}


def _check_sizes(comm, inputs, labels, owned, what):
    """Collective: every rank has the same N and N subimages for each owned subdomain."""
    n = len(labels)
    bad = [s for s in owned if s not in inputs or len(inputs[s]) != n]
    per_rank = [(n, bad)] if comm is None else comm.allgather((n, bad))
    sizes = [m for m, _ in per_rank]
    if len(set(sizes)) != 1:
        raise CoherentError(f"{what}: ranks hold different numbers of samples {sizes}")
    if any(b for _, b in per_rank):
        raise CoherentError(f"{what}: subimages missing or not {n} long for subdomains "
                            f"{[b for _, b in per_rank]} (per rank)")
    return n


@torch.no_grad()
def predict_coherent(model: CoherentCNNDNN, inputs, batch_size=256, device=None):
    """Class probabilities (N, classes) on every rank; eval mode. Collective over model.comm."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(_as_tensor(inputs[model.owned[0]]))
    sizes = [n] if model.comm is None else model.comm.allgather(n)
    if len(set(sizes)) != 1:
        raise CoherentError(f"ranks hold different numbers of samples {sizes}")
    out = []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        out.append(torch.softmax(model(_batch(inputs, model.owned, idx, device)), 1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def evaluate_coherent(model: CoherentCNNDNN, inputs, labels, batch_size=256, device=None):
    """(mean cross-entropy, accuracy) of the coherent model, the same on every rank."""
    probs = predict_coherent(model, inputs, batch_size, device)
    labels = _as_tensor(labels, torch.long)
    loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), labels).item()
    acc = (probs.argmax(1) == labels).double().mean().item()
    return loss, acc


def batch_order(num_samples, seed, epoch):
    """The shared permutation of epoch ``epoch``: the same on every rank."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)


def train_coherent(local_models: Dict[int, nn.Module], coarse: nn.Module,
                   train_inputs: Mapping[int, torch.Tensor], train_labels, comm=None, *,
                   val: Optional[Tuple[Mapping[int, torch.Tensor], Sequence[int]]] = None,
                   test: Optional[Tuple[Mapping[int, torch.Tensor], Sequence[int]]] = None,
                   num_subdomains: Optional[int] = None, epochs: int = 10, batch_size: int = 64,
                   lr: float = 1e-3, local_lr: Optional[float] = None, optimizer: str = "adam",
                   weight_decay: float = 0.0, momentum: float = 0.9, seed: int = 0,
                   output: str = "probabilities", device="cpu", drop_last: bool = False,
                   local_states: Optional[Mapping[int, dict]] = None,
                   coarse_state: Optional[dict] = None, coarse_grad_sync: bool = False,
                   coarse_tol: float = 1e-6, eval_batch_size: int = 256,
                   log: Optional[Callable[[str], None]] = None,
                   scheduler: Optional[Callable] = None):
    """Train the coherent CNN-DNN end to end; collective over ``comm`` (None: one process).

    ``local_models``/``train_inputs``: {subdomain: CNN} and {subdomain: (N, C, *sub_shape)}
    for the subdomains this rank owns; ``train_labels`` (N,) the same on every rank. ``val`` and
    ``test``: (inputs, labels) in the same form. Transfer learning: ``local_states``
    ({subdomain: state_dict}, e.g. the trained CNNs of the CNN-DNN; other ranks' entries are
    ignored) and ``coarse_state`` are loaded first; ``local_lr`` (default ``lr``) sets a separate
    learning rate for the local CNNs (e.g. smaller, to fine-tune them). ``coarse_grad_sync``
    averages the coarse gradients over ``comm`` every step (only needed where identical inputs
    can give different results, e.g. non-deterministic GPU kernels); the replicas are compared
    at the end of every epoch and a difference above ``coarse_tol`` raises. ``scheduler``: a
    function of the optimizer returning a torch learning-rate scheduler, stepped after every
    epoch (e.g. ``lambda opt: CosineAnnealingLR(opt, epochs)``; None: constant rates).

    Modules are trained in place. Returns the history (the same on every rank but for the
    timings): lists
    ``epoch, train_loss, train_acc, val_loss, val_acc, coarse_replica_diff, seconds`` and, with
    ``test``, scalars ``test_loss, test_acc`` of the final model.
    """
    device = torch.device(device)
    say = log or (lambda msg: None)
    for s, model in local_models.items():
        if local_states and s in local_states:
            model.load_state_dict(local_states[s])
    if coarse_state is not None:
        coarse.load_state_dict(coarse_state)
    model = CoherentCNNDNN(local_models, coarse, comm, num_subdomains, output, seed).to(device)
    owned = model.owned
    labels = _as_tensor(train_labels, torch.long)
    n = _check_sizes(comm, train_inputs, labels, owned, "train")
    for name, split in (("val", val), ("test", test)):
        if split is not None:
            _check_sizes(comm, split[0], _as_tensor(split[1]), owned, name)

    groups = [{"params": list(model.coarse.parameters())}]
    local_params = list(model.local.parameters())
    if local_params:
        groups.append({"params": local_params, "lr": lr if local_lr is None else local_lr})
    if optimizer not in ("adam", "adamw", "sgd"):
        raise CoherentError(f"optimizer must be adam, adamw or sgd, got {optimizer!r}")
    opt = make_optimizer(groups, OptimizerConfig(optimizer, lr, weight_decay, momentum))
    sched = scheduler(opt) if scheduler is not None else None

    history = {k: [] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc",
                               "coarse_replica_diff", "seconds")}
    for epoch in range(epochs):
        start_time = time.perf_counter()
        model.train()
        order = torch.from_numpy(batch_order(n, seed, epoch))
        stop = n - n % batch_size if drop_last else n
        loss_sum, correct, seen = 0.0, 0, 0
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            xb = _batch(train_inputs, owned, idx, device)
            yb = labels[idx].to(device)
            opt.zero_grad(set_to_none=True)
            logits = model(xb)                      # all-gather inside; same logits everywhere
            loss = F.cross_entropy(logits, yb)
            loss.backward()                         # each rank: coarse replica + own CNNs
            if coarse_grad_sync:
                allreduce_mean_grads(comm, model.coarse.parameters())
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        if sched is not None:
            sched.step()
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(loss_sum / max(seen, 1))
        history["train_acc"].append(correct / max(seen, 1))
        if val is not None:
            vl, va = evaluate_coherent(model, val[0], val[1], eval_batch_size, device)
        else:
            vl, va = float("nan"), float("nan")
        history["val_loss"].append(vl)
        history["val_acc"].append(va)
        diff = 0.0 if comm is None else max_replica_difference(comm, model.coarse)
        history["coarse_replica_diff"].append(diff)
        history["seconds"].append(time.perf_counter() - start_time)
        say(f"coherent epoch {epoch + 1}/{epochs}: train loss {history['train_loss'][-1]:.4f} "
            f"acc {history['train_acc'][-1]:.4f}, val loss {vl:.4f} acc {va:.4f}")
        if diff > coarse_tol:
            raise RuntimeError(
                f"coarse DNN replicas differ by {diff:.3g} > {coarse_tol:g} after epoch "
                f"{epoch + 1}; non-deterministic kernels? use coarse_grad_sync=True")
    if test is not None:
        history["test_loss"], history["test_acc"] = evaluate_coherent(
            model, test[0], test[1], eval_batch_size, device)
    return history
