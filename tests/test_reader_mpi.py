"""Many ranks reading one data set file: each rank reads only its own subdomain(s).

    mpirun -n 4 python -m pytest --with-mpi -m mpi tests/test_reader_mpi.py   # 1 subdomain/rank
    mpirun -n 2 python -m pytest --with-mpi -m mpi tests/test_reader_mpi.py   # 2 subdomains/rank

Rank 0 writes the file into a directory shared by all ranks; after a barrier every rank opens it
(read-only, no HDF5 file locking) and compares its subdomains with the numpy slices of the full
images. Assertions are collective (``assert_all``), so one failing rank never hangs the others.
"""

import numpy as np
import pytest
import torch

from helpers import assert_all

pytestmark = pytest.mark.mpi(min_size=2)


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _shared_file(comm, directory, name, write):
    """Rank 0 writes ``directory / name`` with ``write(path)``; every rank gets the path after
    a barrier, or all raise together if the write failed."""
    path = directory / name
    error = None
    if comm.rank == 0:
        try:
            write(path)
        except Exception as err:  # reported on every rank below
            error = repr(err)
    error = comm.bcast(error, root=0)
    comm.Barrier()
    assert error is None, f"rank 0 could not write {path}: {error}"
    return path


def _write_mnistlike(path, sample_shape, n=257, seed=7):
    from ddmpi.data.schema import DatasetWriter

    rng = np.random.default_rng(seed)
    with DatasetWriter(path, name=path.stem, classes=list(range(10)),
                       converter="tests.test_reader_mpi") as writer:
        writer.write_split("train", rng.random((n,) + sample_shape, dtype=np.float32),
                           rng.integers(0, 10, n))
        writer.write_split("test", rng.random((n // 3,) + sample_shape, dtype=np.float32),
                           rng.integers(0, 10, n // 3))


def _my_subdomains(comm, dec):
    """Round-robin: rank r owns subdomains r, r + size, ... (a stand-in for ddmpi.parallel.mapping)."""
    return list(range(comm.rank, dec.num_subdomains, comm.size))


def _check_rank_reads(comm, path, dec):
    import h5py

    from ddmpi.data.reader import SubdomainDataset, load_subdomain
    from ddmpi.data.schema import read_info

    info = read_info(path)
    shape = (-1,) + (1,) * dec.ndim
    mine = _my_subdomains(comm, dec)
    ok, detail = True, ""
    try:
        with h5py.File(path, "r", locking=False) as f:
            full = {s: (f[s]["images"][()], f[s]["labels"][()]) for s in ("train", "test")}
        for sub in mine:
            for split, (images, labels) in full.items():
                raw = np.ascontiguousarray(dec.extract(images, sub))
                norm = (raw - info.mean.reshape(shape)) / info.std.reshape(shape)
                x, y = load_subdomain(path, split, dec, sub)
                x_raw, _ = load_subdomain(path, split, dec, sub, normalize=False)
                lazy = SubdomainDataset(path, split, dec, sub, in_memory=False)
                idx = np.random.default_rng(sub).permutation(len(lazy))[:40]
                xb, yb = lazy.read_block(idx)
                checks = {
                    "normalised": np.array_equal(x, norm),
                    "raw": np.array_equal(x_raw, raw),
                    "labels": np.array_equal(y, labels),
                    "lazy batch": np.array_equal(xb.numpy(), norm[idx])
                    and np.array_equal(yb.numpy(), labels[idx]),
                    "in memory": torch.equal(
                        SubdomainDataset(path, split, dec, sub, in_memory=True).tensors()[0],
                        torch.from_numpy(norm)),
                }
                lazy.close()
                bad = [k for k, v in checks.items() if not v]
                if bad:
                    ok, detail = False, f"subdomain {sub} split {split}: {bad} differ"
    except Exception as err:  # reported collectively
        ok, detail = False, repr(err)
    owned = comm.allgather(mine)
    details = comm.allgather(detail if not ok else "")
    assert_all(comm, ok, "; ".join(f"rank {r}: {d}" for r, d in enumerate(details) if d))
    # every subdomain is read by exactly one rank
    assert sorted(s for subs in owned for s in subs) == list(range(dec.num_subdomains))
    return mine


def test_each_rank_reads_its_2x2_subdomains(mpi_tmp_path):
    from ddmpi.data.decomposition import Decomposition

    comm = _world()
    path = _shared_file(comm, mpi_tmp_path, "img28.h5",
                        lambda p: _write_mnistlike(p, (1, 28, 28)))
    mine = _check_rank_reads(comm, path, Decomposition((28, 28), (2, 2), overlap=2))
    if comm.size == 4:
        assert_all(comm, mine == [comm.rank], "with 4 ranks each rank owns one subdomain")
    if comm.size == 2:
        assert_all(comm, len(mine) == 2, "with 2 ranks each rank owns two subdomains")


def test_each_rank_reads_its_3d_subdomains(mpi_tmp_path):
    from ddmpi.data.decomposition import Decomposition

    comm = _world()
    path = _shared_file(comm, mpi_tmp_path, "vol.h5",
                        lambda p: _write_mnistlike(p, (2, 9, 12, 10), n=41))
    _check_rank_reads(comm, path, Decomposition((9, 12, 10), (2, 2, 1), overlap=(1, 2, 0)))


def test_all_ranks_read_the_same_subdomain_at_once(mpi_tmp_path):
    """Concurrent read-only opens of one file (no locking) from every rank, same hyperslab."""
    from ddmpi.data.decomposition import Decomposition
    from ddmpi.data.reader import load_subdomain

    comm = _world()
    path = _shared_file(comm, mpi_tmp_path, "same.h5",
                        lambda p: _write_mnistlike(p, (1, 28, 28), n=100))
    dec = Decomposition((28, 28), (2, 2), overlap=2)
    comm.Barrier()
    x, y = load_subdomain(path, "train", dec, 1)
    digest = float(np.float64(x.sum())) + float(y.sum())
    digests = comm.allgather(digest)
    assert_all(comm, digests[comm.rank] == digests[0], "ranks read different data")
