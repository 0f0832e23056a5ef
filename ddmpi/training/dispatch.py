"""Count what a block of PyTorch code dispatches: operators that launch device work, and reads
of a tensor into a Python scalar (each one waits for the device on a GPU).

    with OperatorCounter() as ops:
        train_one_epoch(...)
    ops.launches, ops.scalar_reads

Used by tests/test_defects.py and benchmarks/bench_step.py to hold the training step lean.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OperatorCounter"]

_NO_KERNEL = {torch.ops.aten.detach, torch.ops.aten.lift_fresh}


class OperatorCounter(TorchDispatchMode):
    """Counts dispatched operators (views and detaches excluded: they launch nothing) and
    tensor-to-scalar reads (``item``, ``float``, ``bool``, ``int``)."""

    def __init__(self):
        super().__init__()
        self.launches = 0
        self.scalar_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in _NO_KERNEL:
            self.launches += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        return func(*args, **(kwargs or {}))
