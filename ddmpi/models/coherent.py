"""The coherent CNN-DNN: local CNNs on their ranks and a replicated coarse network, one model.

Forward: every rank's CNNs map their subimages to class probabilities, one all-gather puts all
S decisions in subdomain order on every rank, and each rank's identical coarse replica maps
them to the global logits. Backward needs no communication (docs/architecture.md).
"""

import contextlib
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ddmpi.coarse.combiners import EPS


class CoherentError(ValueError):
    """Inconsistent subdomain ownership or inputs for the coherent CNN-DNN."""


@dataclass(frozen=True)
class SubdomainLayout:
    """Who owns which subdomain: ``owners[r]`` lists group rank r's subdomains (sorted)."""

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
    def from_group(cls, group, owned, num_subdomains=None):
        """Collective over ``group`` (None: one process owning ``owned``)."""
        owned = tuple(sorted(int(s) for s in owned))
        owners = (owned,) if group is None else tuple(tuple(o) for o in group.allgather(owned))
        every = [s for o in owners for s in o]
        n = len(every) if num_subdomains is None else int(num_subdomains)
        if sorted(every) != list(range(n)):
            raise CoherentError(
                f"subdomain ownership {list(owners)} must cover 0..{n - 1} exactly once")
        if any(not o for o in owners):
            raise CoherentError(f"every rank must own a subdomain: {list(owners)}")
        return cls(n, owners, 0 if group is None else group.rank)


class GatherDecisions(torch.autograd.Function):
    """(n_own, B, K) local outputs -> (S, B, K) in subdomain order on every rank.

    Backward keeps this rank's slices: the loss is computed identically on every rank, so the
    incoming gradient is already complete.
    """

    @staticmethod
    def forward(ctx, local, group, layout):
        ctx.owned = layout.owned
        n_own, batch, k = local.shape
        order = torch.as_tensor(np.argsort(layout.gather_order), dtype=torch.long)
        if group is None or group.size == 1:
            gathered = local.detach()
        else:
            send = local.detach().float().to("cpu").numpy()
            counts = [len(o) for o in layout.owners]
            gathered = torch.from_numpy(group.allgatherv(send, counts)).to(local.device,
                                                                            local.dtype)
        return gathered[order.to(gathered.device)].clone()

    @staticmethod
    def backward(ctx, grad_full):
        index = torch.as_tensor(ctx.owned, dtype=torch.long, device=grad_full.device)
        return grad_full.index_select(0, index), None, None


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
    """This rank's CNNs ``{subdomain: CNN}`` plus a replica of the coarse network.

    ``coarse`` is a :class:`~ddmpi.coarse.dnn.CoarseNet` over the S local probabilities.
    Construction is collective over ``group`` (None: one process with every subdomain); rank
    0's coarse replica is broadcast.
    ``seed`` gives every module its own random stream, so results do not depend on the layout.
    """

    def __init__(self, local_models: Mapping[int, nn.Module], coarse: nn.Module, group=None,
                 num_subdomains=None, seed: Optional[int] = 0):
        super().__init__()
        self.group = group
        self.layout = SubdomainLayout.from_group(group, local_models.keys(), num_subdomains)
        self.local = nn.ModuleDict({str(s): local_models[s] for s in self.layout.owned})
        self.coarse = coarse
        self._streams = None
        if seed is not None:
            self._streams = {s: RngStream(seed + s) for s in self.layout.owned}
            self._streams["coarse"] = RngStream(seed + self.layout.num_subdomains)
        if group is not None and group.size > 1:
            group.broadcast_module(self.coarse)

    @property
    def owned(self):
        return self.layout.owned

    def _stream(self, key, device):
        if self._streams is None:
            return contextlib.nullcontext()
        return self._streams[key].active(device)

    def local_outputs(self, inputs: Mapping[int, torch.Tensor]):
        """(n_own, B, K): the owned CNNs' softmax outputs in owned order."""
        outs = []
        for s in self.layout.owned:
            with self._stream(s, inputs[s].device):
                outs.append(torch.softmax(self.local[str(s)](inputs[s]).float(), dim=1))
        return torch.stack(outs)

    def forward(self, inputs: Mapping[int, torch.Tensor]):
        """Class logits (B, K), identical on every rank. Collective over ``group``."""
        full = GatherDecisions.apply(self.local_outputs(inputs), self.group, self.layout)
        probs = full.permute(1, 0, 2)                                    # (B, S, K)
        if self.coarse.config["inputs"] == "log":
            probs = torch.log(probs + EPS)
        with self._stream("coarse", full.device):
            return self.coarse(probs.reshape(len(probs), -1))
