"""Shared fixtures: a small real data set (scikit-learn digits) in the ddmpi HDF5 format."""

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Ranks and pytest workers share 2 cores here: one intra-op thread each."""
    import torch

    torch.set_num_threads(1)


def write_digits_h5(path, seed=0):
    """Write the 1,797 real scikit-learn digits as a ddmpi data set (70/15/15 split by ``seed``)."""
    from helpers import digits_arrays

    from ddmpi.data.schema import DatasetWriter

    images, labels = digits_arrays()
    order = np.random.default_rng(seed).permutation(len(images))
    n_train, n_val = int(0.7 * len(order)), int(0.15 * len(order))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    with DatasetWriter(path, name="digits", classes=[str(d) for d in range(10)],
                       converter="tests.conftest", provenance={"source": "sklearn"}) as writer:
        for split, idx in parts.items():
            writer.write_split(split, images[idx], labels[idx], ids=[str(i) for i in idx])
    return path


@pytest.fixture(scope="session")
def digits_h5(tmp_path_factory):
    """Path of the digits data set, written once per session (per rank under MPI)."""
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    return write_digits_h5(tmp_path_factory.mktemp(f"digits_rank{rank}") / "digits.h5")


@pytest.fixture
def mpi_digits(mpi_tmp_path):
    """Path of the digits data set in pytest-mpi's directory shared by all ranks, written once
    by rank 0 (collective: every rank of COMM_WORLD must request it)."""
    from mpi4py import MPI

    path = mpi_tmp_path / "digits.h5"
    if MPI.COMM_WORLD.rank == 0:
        write_digits_h5(path)
    MPI.COMM_WORLD.Barrier()
    return path


DIGITS_CNN = dict(family="vgg", spatial_dims=2, in_channels=1, num_classes=10,
                  input_shape=(8, 8), depth=2, width=8)   # build_cnn arguments for whole digits


@pytest.fixture(scope="module")
def digits_sources():
    """Whole digits as (train, val) TensorSources: 1,200 and 300 samples, normalised."""
    import torch
    from helpers import digits_arrays

    from ddmpi.data.schema import Normalization
    from ddmpi.data.sources import TensorSource

    x, y = digits_arrays()
    x, norm = torch.from_numpy(x), Normalization([0.3], [0.4])
    return (TensorSource(x[:1200], y[:1200], norm), TensorSource(x[1200:1500], y[1200:1500], norm))
