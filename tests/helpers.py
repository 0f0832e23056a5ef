"""Helpers shared by the test modules: real-data locations, collective MPI assertions and an
operator counter (also used by benchmarks/bench_step.py)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

SHARED_DATA = Path(os.environ.get(
    "DDMPI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data(name):
    """Path of a real data set under ``../shared/data``; skip the test with a reason if absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data set {path} is absent (set DDMPI_SHARED_DATA or place "
                    f"../shared/data beside the checkout)")
    return path


def assert_all(comm, condition, message="assertion failed on some rank"):
    """Collective assertion: every rank fails together if ``condition`` is false on any rank.

    A plain ``assert`` failing on one rank would leave the others blocked in the next
    collective; here all ranks learn which ranks failed and raise together.
    """
    failed = comm.allgather(not bool(condition))
    bad = [rank for rank, f in enumerate(failed) if f]
    assert not bad, f"{message} (ranks {bad})"


def assert_on_root(comm, checks, message="checks failed on rank 0"):
    """Collective: run ``checks()`` on rank 0 only (a dict ``{name: bool}``) and fail on every
    rank if a check is false or ``checks`` raised, so that an exception on rank 0 cannot leave
    the other ranks waiting in the next collective."""
    bad = []
    if comm.rank == 0:
        try:
            bad = [name for name, ok in checks().items() if not ok]
        except Exception as err:  # reported on every rank below
            bad = [f"raised {err!r}"]
    assert_all(comm, not bad, f"{message}: {bad}" if comm.rank == 0 else message)


def digits_arrays():
    """scikit-learn's bundled handwritten digits (real data, no download) as (N,1,8,8) in [0,1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    return images, digits.target.astype(np.int64)


def mpirun(n, *command):
    """Command line and environment to launch ``command`` on ``n`` ranks with this MPI.

    Skips the test when no ``mpirun`` is on PATH. Adds Open MPI's flags for running as root and
    for more ranks than cores, which this 2-core machine needs for 4 ranks.
    """
    import shutil
    import subprocess
    import sys

    launcher = shutil.which("mpirun") or shutil.which("mpiexec")
    if launcher is None:
        pytest.skip("no mpirun/mpiexec on PATH")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    flags = []
    version = subprocess.run([launcher, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        flags.append("--oversubscribe")
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for key in [k for k in env if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "OMPI_MCA_orte"))]:
        del env[key]  # a launcher inside an MPI test must not inherit the outer job's identity
    cmd = [launcher, "-n", str(n), *flags, *[sys.executable if c == "python" else c
                                             for c in command]]
    return cmd, env


def corrupt_h5(src, dest, target="chunks"):
    """Copy the data set file ``src`` to ``dest`` with structures overwritten, as bit rot or a
    partial copy would: ``"chunks"``, the chunk index (v1 B-tree) of every images dataset
    (reading images fails, the header still opens); an object's path such as "/train/labels",
    its object header (opening it fails)."""
    import re
    import shutil

    import h5py

    shutil.copy(src, dest)
    raw = bytearray(Path(dest).read_bytes())
    if target == "chunks":
        offsets = [m.start() for m in re.finditer(b"TREE\x01", raw)]  # node type 1: chunks
    else:
        with h5py.File(src, "r") as f:
            offsets = [h5py.h5o.get_info(f[target].id).addr]
    assert offsets, f"no {target} found in {src}"
    for offset in offsets:
        raw[offset:offset + 8] = b"\xaa" * 8
    Path(dest).write_bytes(raw)
    return dest


def digits_subimages(start, stop):
    """Subimages {s: (N, 1, 4, 4)} of the 2x2 subdomains of digits[start:stop], labels (N,)."""
    import torch

    images, labels = digits_arrays()
    images, labels = images[start:stop], labels[start:stop]
    subs = {i * 2 + j: torch.from_numpy(np.ascontiguousarray(
        images[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4])) for i in range(2) for j in range(2)}
    return subs, torch.from_numpy(labels)


def serial_context(run_dir, overrides=(), resume=False):
    """A single-process, CPU :class:`ddmpi.strategies.base.RunContext` for driving
    ``ddmpi.strategies.local.train_cnn`` on in-memory sources (no data set file needed)."""
    import logging
    from types import SimpleNamespace

    import torch

    from ddmpi.config import load_config
    from ddmpi.parallel.group import Group
    from ddmpi.strategies.base import RunContext

    config = load_config(None, [f"run.dir={run_dir}", "run.device=cpu",
                                  "data.path=unused.h5", *overrides])
    return RunContext(config, Group.single(), Path(run_dir), logging.getLogger("ddmpi.tests"),
                      SimpleNamespace(spatial_dims=2), SimpleNamespace(device=torch.device("cpu")),
                      resume)


# ------------------------------------------------ operators a block of code dispatches
# (tests/test_defects.py and benchmarks/bench_step.py hold the training step lean with it)

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
