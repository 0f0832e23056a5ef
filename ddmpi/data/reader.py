"""Per-rank reading of a box (a tuple of slices) of one split of a prepared data set.

How reads map onto chunks (dense whole-chunk reads, sparse hyperslabs) is documented in
docs/dataset-format.md ("Reading").
"""

import itertools
import operator
import os

import h5py
import numpy as np
import torch

from ddmpi.data.decomposition import Decomposition
from ddmpi.data.schema import (
    SPLITS,
    DatasetError,
    check_finite,
    h5_object,
    normalization_of,
    open_h5,
    read_info,
    reading,
    split_labels,
)

__all__ = ["DEFAULT_BLOCK", "DEFAULT_MEMORY_BUDGET", "SubdomainDataset", "as_box", "check_contents",
           "load_subdomain", "read_box", "read_box_h5", "read_subdomain"]

DEFAULT_BLOCK = 4096  # samples per block of in-place normalisation / of a fallback hyperslab read
DEFAULT_MEMORY_BUDGET = 2 * 1024 ** 3  # bytes: in_memory="auto" holds a subdomain up to this
SPARSE_FILL = 1 / 8  # lazy reads filling less of the chunks they touch read only their own bytes


def _check_split(f, path, split):
    if not isinstance(split, str) or split not in f \
            or "images" not in h5_object(f, path, f"/{split}"):
        present = [s for s in ("train", "val", "test") if s in f]
        raise DatasetError(f"{path}: no split {split!r} in this data set (it has {present})")


def _check_decomposition(path, spatial_shape, decomposition):
    if not isinstance(decomposition, Decomposition):
        raise TypeError(f"decomposition must be a ddmpi.data.decomposition.Decomposition, got "
                        f"{type(decomposition).__name__}")
    if tuple(spatial_shape) != decomposition.image_shape:
        raise DatasetError(f"{path}: images are {'x'.join(map(str, spatial_shape))} but the "
                           f"decomposition is for {'x'.join(map(str, decomposition.image_shape))}"
                           f" images")


def as_box(box, spatial_shape, path="<data set>"):
    """``box`` (slices or ``(start, stop)`` pairs, one per spatial axis) as a tuple of slices,
    checked against ``spatial_shape``."""
    try:
        items = list(box)
    except TypeError:
        raise TypeError(f"box must be a tuple of slices, got {box!r}") from None
    if len(items) != len(spatial_shape):
        raise DatasetError(f"{path}: box {box!r} has {len(items)} axes, the images "
                           f"{len(spatial_shape)}")
    out = []
    for axis, (item, n) in enumerate(zip(items, spatial_shape)):
        sl = item if isinstance(item, slice) else slice(*item)
        if sl.step not in (None, 1):
            raise DatasetError(f"{path}: box axis {axis}: step {sl.step} is not supported")
        start, stop, _ = sl.indices(n)
        if sl.start is not None and sl.start < 0 or sl.stop is not None and sl.stop > n \
                or stop <= start:
            raise DatasetError(f"{path}: box axis {axis}: {sl.start}:{sl.stop} is empty or "
                               f"outside 0:{n}")
        out.append(slice(start, stop))
    return tuple(out)


def _block_rows(dset, block):
    """Samples per block of a hyperslab read: a multiple of the chunk's sample extent."""
    per_chunk = dset.chunks[0] if dset.chunks else 1
    return max(1, int(block) // per_chunk) * per_chunk


def _whole_chunks_readable(dset):
    """Whether ``dset``'s stored chunks can be read raw: chunked, all channels in one chunk
    (the schema's layout) and no filters (compression), so a chunk's bytes are its array."""
    return (dset.chunks is not None and dset.chunks[1] == dset.shape[1]
            and dset.id.get_create_plist().get_nfilters() == 0)


def _row_groups(rows, per_chunk):
    """``(n0, local, dest)`` for each chunk row along the sample axis that ``rows`` touches:
    the chunk's first sample, the rows' positions in the chunk and in the output."""
    if isinstance(rows, slice):
        for n0 in range(rows.start // per_chunk * per_chunk, rows.stop, per_chunk):
            a, b = max(rows.start, n0), min(rows.stop, n0 + per_chunk)
            yield n0, slice(a - n0, b - n0), slice(a - rows.start, b - rows.start)
        return
    groups = rows // per_chunk
    cuts = np.flatnonzero(np.diff(groups)) + 1
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, rows.size]):
        n0 = int(groups[a]) * per_chunk
        yield n0, rows[a:b] - n0, slice(int(a), int(b))


def _read_rows(dset, rows, slices, block=DEFAULT_BLOCK, count=None):
    """Samples ``rows`` (a step-1 slice, or sorted unique indices) of the region ``slices``
    of a ``(N, C, *spatial)`` dataset, in its stored dtype, ``(len(rows), C, *region)``.

    Whole chunks, each once (``read_direct_chunk``), else block-wise hyperslabs.
    ``count(nbytes)``, if given, is called with the bytes of every read.
    """
    n_rows = (rows.stop - rows.start) if isinstance(rows, slice) else len(rows)
    region = tuple(s.stop - s.start for s in slices)
    out = np.empty((n_rows, dset.shape[1]) + region, dtype=dset.dtype)
    slices = tuple(slices)
    if not _whole_chunks_readable(dset):
        if not isinstance(rows, slice):
            out[...] = dset[(rows, slice(None)) + slices]
        else:
            step = _block_rows(dset, block)
            for a in range(rows.start, rows.stop, step):
                b = min(rows.stop, a + step)
                out[a - rows.start:b - rows.start] = dset[(slice(a, b), slice(None)) + slices]
        if count is not None:
            count(out.nbytes)
        return out
    chunks, dtype = dset.chunks, dset.dtype
    tiles = chunks[2:]
    starts = [range(s.start // t * t, s.stop, t) for s, t in zip(slices, tiles)]
    for n0, local, dest in _row_groups(rows, chunks[0]):
        for offsets in itertools.product(*starts):
            _, raw = dset.id.read_direct_chunk((n0, 0) + offsets)
            if count is not None:
                count(len(raw))
            chunk = np.frombuffer(raw, dtype=dtype).reshape(chunks)
            src = tuple(slice(max(s.start, o) - o, min(s.stop, o + t) - o)
                        for s, o, t in zip(slices, offsets, tiles))
            dst = tuple(slice(max(s.start, o) - s.start, min(s.stop, o + t) - s.start)
                        for s, o, t in zip(slices, offsets, tiles))
            out[(dest, slice(None)) + dst] = chunk[(local, slice(None)) + src]
    return out


def read_box_h5(h5file, split, box, block=DEFAULT_BLOCK, count=None):
    """``(x, y)`` of ``box`` for all samples of ``split`` of an open h5py file: ``x`` in the
    stored dtype ``(N, C, *box_shape)``, ``y`` int64 ``(N,)``; both checked."""
    path = getattr(h5file, "filename", "<h5 file>")
    _check_split(h5file, path, split)
    name = f"/{split}/images"
    dset = h5_object(h5file, path, name)
    slices = as_box(box, dset.shape[2:], path)
    with reading(path, name):
        x = _read_rows(dset, slice(0, dset.shape[0]), slices, block, count)
    return check_finite(x, path, split), split_labels(h5file, split, path)


def check_contents(path, block_bytes=64 << 20):
    """Read every split of the data set at ``path`` once, ``block_bytes`` of images at a time,
    with the checks its readers make (labels index the classes, float images are finite): a
    :class:`DatasetError` now rather than in mid-training."""
    with open_h5(path) as f:
        for split in SPLITS:
            if split not in f:
                continue
            split_labels(f, split, path)
            images = h5_object(f, path, f"/{split}/images")
            if images.dtype.kind != "f":
                continue
            rows = max(1, block_bytes // (images.dtype.itemsize * int(np.prod(images.shape[1:]))))
            for i in range(0, len(images), rows):
                with reading(path, f"/{split}/images"):
                    block = images[i:i + rows]
                check_finite(block, path, split)


def read_box(path, split, box, block=DEFAULT_BLOCK, count=None):
    """``(x_stored, y)`` of ``box`` (slices of the image) for all samples of ``split``.

    Validates the file; reads each stored chunk that intersects the box once, whole.
    """
    info = read_info(path)
    if split not in info.splits:
        raise DatasetError(f"{info.path}: no split {split!r} in this data set "
                           f"(it has {list(info.splits)})")
    with open_h5(path) as f:
        return read_box_h5(f, split, box, block, count)


def read_subdomain(h5file, split, decomposition, subdomain, normalize=True,
                   block=DEFAULT_BLOCK):
    """One subdomain of all samples of ``split`` of an open h5py file, as float32 ``(x, y)``:
    normalised with the file's train statistics unless ``normalize=False`` (then in [0, 1])."""
    path = getattr(h5file, "filename", "<h5 file>")
    _check_split(h5file, path, split)
    norm = normalization_of(h5file, path)
    _check_decomposition(path, h5_object(h5file, path, f"/{split}/images").shape[2:],
                         decomposition)
    x, y = read_box_h5(h5file, split, decomposition.slices(subdomain), block)
    return (norm.apply(x, block) if normalize else norm.unit(x)), y


def load_subdomain(path, split, decomposition, subdomain, normalize=True, block=DEFAULT_BLOCK):
    """Load one subdomain of all samples of ``split`` of the data set at ``path``.

    Returns numpy ``(x, y)``: ``x`` float32 ``(N, C, *subdomain_shape)``, normalised unless
    ``normalize=False`` (then in [0, 1]); ``y`` int64 ``(N,)``.
    """
    info = read_info(path)  # validates the file against the schema
    if split not in info.splits:
        raise DatasetError(f"{info.path}: no split {split!r} in this data set "
                           f"(it has {list(info.splits)})")
    _check_decomposition(info.path, info.spatial_shape, decomposition)
    with open_h5(path) as f:
        x, y = read_box_h5(f, split, decomposition.slices(subdomain), block)
    norm = info.normalization
    return (norm.apply(x, block) if normalize else norm.unit(x)), y


class SubdomainDataset(torch.utils.data.Dataset):
    """The samples of one subdomain of one split, as a torch ``Dataset``.

    ``dataset[i]`` is ``(x, label)``: ``x`` a float32 tensor ``(C, h, w)`` / ``(C, d, h, w)``,
    ``label`` an int. :meth:`read_block` (and ``__getitems__``, which torch's DataLoader uses
    for whole batches) reads many samples in one go.

    ``in_memory``: ``True`` loads the subdomain of the whole split at construction (with
    :func:`load_subdomain`: whole chunks, each once, then the file is closed); ``False`` reads
    on demand from a file handle opened on first access in each process (the object is
    picklable and holds no handle until then, so DataLoader workers and MPI ranks each open
    their own); ``"auto"`` (default) loads when the subdomain's bytes for this split are at
    most ``memory_budget`` (default 2 GiB).

    Raises ``DatasetError`` naming the file for a file that is not a ddmpi data set, a missing
    split, or images whose shape does not match the decomposition; ``ValueError`` for a
    subdomain outside the grid.
    """

    def __init__(self, path, split, decomposition, subdomain, normalize=True, in_memory="auto",
                 memory_budget=DEFAULT_MEMORY_BUDGET, block=DEFAULT_BLOCK):
        if in_memory not in (True, False, "auto"):
            raise ValueError(f"in_memory must be True, False or 'auto', got {in_memory!r}")
        self.info = read_info(path)
        self.path = self.info.path
        if split not in self.info.splits:
            raise DatasetError(f"{self.path}: no split {split!r} in this data set "
                               f"(it has {list(self.info.splits)})")
        _check_decomposition(self.path, self.info.spatial_shape, decomposition)
        self.split = split
        self.decomposition = decomposition
        self.index = decomposition.as_index(subdomain)
        self.subdomain = decomposition.linear(self.index)
        self.slices = decomposition.slices(self.index)
        self.normalize = bool(normalize)
        self.block = int(block)
        self.sample_shape = (self.info.channels,) + decomposition.subdomain_shape(self.index)
        self.num_samples = self.info.splits[split]
        self.nbytes = self.num_samples * int(np.prod(self.sample_shape)) * 4
        self._norm = self.info.normalization
        self.in_memory = bool(in_memory if in_memory != "auto"
                              else self.nbytes <= memory_budget)
        self._h5 = self._images = self._pid = None
        if self.in_memory:
            x, y = load_subdomain(self.path, split, decomposition, self.index,
                                  normalize=self.normalize, block=self.block)
            self._x = torch.from_numpy(x)
        else:
            self._x = None
            with open_h5(self.path) as f:
                y = split_labels(f, split, self.path)
        self.labels = torch.from_numpy(y)

    # -- file handle: opened lazily, once per process ------------------------------------------

    @property
    def is_open(self):
        """Whether this process holds an open file handle (never for in-memory data)."""
        return self._h5 is not None and self._pid == os.getpid()

    def _dataset(self):
        """The images dataset of this process's handle, opened on first use. It is opened
        without a chunk cache: sparse selections then read only their own bytes from each
        chunk, and dense ones go through :func:`_read_rows` (whole chunks, each once)."""
        if not self.is_open:
            # A handle inherited through fork() belongs to the parent: open our own.
            h5 = open_h5(self.path)
            dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            dapl.set_chunk_cache(0, 0, 1.0)
            # (if this process already has the dataset open elsewhere, HDF5 shares that
            # open object and its cache: still correct, possibly more bytes for sparse reads)
            name = f"/{self.split}/images"
            with reading(self.path, name):
                self._images = h5py.Dataset(h5py.h5d.open(h5.id, name.encode(), dapl))
            self._h5, self._pid = h5, os.getpid()
        return self._images

    def close(self):
        """Close this process's file handle, if any (reopened on the next access)."""
        if self.is_open:
            self._images = None
            self._h5.close()
        self._h5 = self._images = self._pid = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_h5=None, _images=None, _pid=None)
        return state

    # -- access --------------------------------------------------------------------------------

    def __len__(self):
        return self.num_samples

    @property
    def num_classes(self):
        return self.info.num_classes

    def _indices(self, indices):
        idx = np.asarray(indices)
        if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
            if idx.size == 0:
                idx = idx.astype(np.int64)
            else:
                raise TypeError(f"sample indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        n = self.num_samples
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"sample index out of range for {n} samples of split "
                             f"{self.split!r}")
        return np.where(idx < 0, idx + n, idx)

    def read_block(self, indices):
        """Samples ``indices`` (any order, repeats allowed) as ``(x, y)`` tensors:
        ``x`` float32 ``(B, C, *subdomain_shape)``, ``y`` int64 ``(B,)``.

        From the file, the samples are read in one selection of increasing, unique indices
        (what HDF5 requires; a contiguous run becomes one slice) and put back in the order asked.
        A selection filling less than :data:`SPARSE_FILL` of the chunks it touches along the
        sample axis (a random batch, a single sample) reads only its own bytes (in small reads,
        no chunk cache); a denser one reads each chunk it touches once, whole.
        """
        idx = self._indices(indices)
        y = self.labels[torch.from_numpy(idx)]
        if self.in_memory:
            return self._x[torch.from_numpy(idx)], y
        if idx.size == 0:
            return torch.empty((0,) + self.sample_shape, dtype=torch.float32), y
        uniq, inverse = np.unique(idx, return_inverse=True)
        images = self._dataset()
        contiguous = uniq[-1] - uniq[0] + 1 == uniq.size
        rows = slice(int(uniq[0]), int(uniq[-1]) + 1) if contiguous else uniq
        with reading(self.path, f"/{self.split}/images"):
            if self._sparse(uniq, images.chunks):  # HDF5 reads only the selected bytes
                x = np.asarray(images[(rows, slice(None)) + self.slices])
            else:  # whole chunks, each once
                x = _read_rows(images, rows, self.slices, self.block)
        x = self._norm.apply(x, self.block) if self.normalize else self._norm.unit(x)
        if not np.array_equal(uniq, idx):
            x = x[inverse.reshape(-1)]
        return torch.from_numpy(np.ascontiguousarray(x)), y

    @staticmethod
    def _sparse(uniq, chunks):
        """Whether sorted unique sample indices fill less than :data:`SPARSE_FILL` of the
        chunks they touch along the sample axis (then whole-chunk reads would mostly be waste)."""
        per_chunk = chunks[0] if chunks else 1
        touched = np.unique(uniq // per_chunk).size * per_chunk
        return uniq.size < SPARSE_FILL * touched

    def __getitem__(self, i):
        if isinstance(i, (bool, np.bool_)):
            raise TypeError("sample index must be an integer, got a bool")
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"sample index must be an integer, got {type(i).__name__}; "
                            f"use read_block() for many samples") from None
        x, y = self.read_block([i])
        return x[0], int(y[0])

    def __getitems__(self, indices):
        """A batch as a list of ``(x, label)`` pairs, read in one selection (torch's DataLoader
        calls this with a batch's indices and then collates the list)."""
        x, y = self.read_block(indices)
        return list(zip(x, y.tolist()))

    def tensors(self):
        """The whole split's subdomain as ``(x, y)`` tensors (loads it if not in memory)."""
        if self.in_memory:
            return self._x, self.labels
        self._dataset()
        x, _ = read_subdomain(self._h5, self.split, self.decomposition, self.index,
                              normalize=self.normalize, block=self.block)
        return torch.from_numpy(x), self.labels

    def __repr__(self):
        return (f"SubdomainDataset({str(self.path)!r}, split={self.split!r}, subdomain="
                f"{self.subdomain} {self.index}, samples={self.num_samples}, "
                f"shape={self.sample_shape}, in_memory={self.in_memory})")
