"""Batch sources of one rank's box of one split: in memory (:class:`TensorSource`) or streamed
from the HDF5 file (:class:`StreamingSource`); :func:`open_source` picks one.

Both yield ``(x, y, idx)`` batches: ``x`` float32 normalised ``(B, C, *box_shape)``, ``y`` and
``idx`` int64 ``(B,)``, in the order given. Design notes: docs/dataset-format.md ("Sources").
"""

import os
import queue
import threading

import numpy as np
import torch

from ddmpi.config import ConfigError
from ddmpi.data.reader import DEFAULT_BLOCK, _read_rows, as_box, read_box
from ddmpi.data.schema import (
    SPLITS,
    DatasetError,
    check_finite,
    h5_object,
    open_h5,
    read_info,
    reading,
    split_labels,
)

__all__ = ["StreamingSource", "TensorSource", "block_rows_for_budget", "box_nbytes",
           "open_source", "open_splits", "seeded_generator"]

BLOCK_TARGET_BYTES = 16 * 1024 ** 2  # StreamingSource block without a budget: about this size
STREAM_FRACTION = 0.5  # streamed blocks alive at once hold at most this fraction of the budget
GiB = 1024 ** 3  # the unit of memory_budget_gb


def block_rows_for_budget(sample_bytes, chunk_rows, budget_bytes, sources=1, prefetch=2):
    """Rows per streamed block, a multiple of ``chunk_rows``: the most that lets ``sources``
    sources of ``prefetch + 2`` blocks each fit ``STREAM_FRACTION`` of ``budget_bytes``.

    Raises :class:`ConfigError` naming ``data.memory_budget_gb`` if one chunk per block does not.
    """
    alive = int(sources) * (int(prefetch) + 2)
    chunk_bytes = int(chunk_rows) * int(sample_bytes)
    chunks = int(STREAM_FRACTION * budget_bytes // (alive * chunk_bytes))
    if chunks < 1:
        need = alive * chunk_bytes / STREAM_FRACTION / GiB
        raise ConfigError(
            f"data.memory_budget_gb: {budget_bytes / GiB:.4g} is too small to stream "
            f"{sources} source(s): {alive} blocks alive of at least one HDF5 chunk "
            f"({chunk_rows} rows, {chunk_bytes / 2 ** 20:.2f} MiB) must fit "
            f"{STREAM_FRACTION:.0%} of it; give at least {need:.4g} (or data.in_memory: true)")
    return chunks * int(chunk_rows)


def seeded_generator(seed, epoch):
    """The torch generator of one epoch's order (the formula the training loop always used)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _as_order(order, n):
    """``order`` as an int64 numpy array of indices in ``[0, n)``."""
    idx = torch.as_tensor(order).reshape(-1)
    if idx.numel() and (idx.dtype.is_floating_point or idx.dtype == torch.bool):
        raise TypeError(f"sample indices must be integers, got {idx.dtype}")
    idx = idx.to(torch.int64).cpu().numpy()
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"sample index out of range for {n} samples")
    return idx


def _check_batch_size(batch_size):
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return int(batch_size)


class TensorSource:
    """A box of a split held in memory in its stored dtype, normalised per batch.

    ``x_stored`` ``(N, C, *box_shape)`` (uint8 or float32), ``y`` ``(N,)``, ``normalization`` a
    :class:`ddmpi.data.schema.Normalization`. ``pin=True``: batches in pinned memory (CUDA).
    """

    def __init__(self, x_stored, y, normalization, box=None, pin=False):
        self.x = torch.as_tensor(x_stored)
        self.labels = torch.as_tensor(y, dtype=torch.int64).cpu()
        if len(self.x) != len(self.labels):
            raise ValueError(f"{len(self.x)} samples but {len(self.labels)} labels")
        self._y = self.labels.to(self.x.device)
        self.normalization = normalization
        self.box = tuple(box) if box is not None else tuple(
            slice(0, s) for s in self.x.shape[2:])
        if pin and not torch.cuda.is_available():
            raise ValueError("pin=True needs CUDA (pinned memory serves host-to-GPU copies)")
        self.pin = bool(pin) and self.x.device.type == "cpu"
        self.normalized = False  # True: ``x`` holds network inputs already (see ``to``)

    def __len__(self):
        return len(self.labels)

    @property
    def y(self):
        """The labels on the CPU (alias of :attr:`labels`, for older evaluation code)."""
        return self.labels

    @property
    def device(self):
        return self.x.device

    @property
    def nbytes(self):
        """Bytes of the stored images held."""
        return self.x.numel() * self.x.element_size()

    def to(self, device):
        """A copy whose images live on ``device`` (batches then come out there); float32
        images are normalised once on the way, uint8 ones stay compact and per batch."""
        moved = TensorSource(self.x.to(device), self.labels, self.normalization, self.box)
        if moved.x.dtype == torch.float32:
            moved.x = self.normalization.apply_torch(moved.x, out=moved.x)
            moved.normalized = True
        return moved

    def epoch_order(self, seed, epoch):
        """The shuffled order of one epoch: ``torch.randperm`` seeded by (seed, epoch)."""
        return torch.randperm(len(self), generator=seeded_generator(seed, epoch))

    def take(self, indices):
        """``(x normalised float32, y)`` of ``indices``, on the source's device."""
        return self._take(torch.as_tensor(indices, dtype=torch.int64).to(self.x.device))

    def _take(self, idx):
        x = self.x.index_select(0, idx)
        if not self.normalized:
            x = self.normalization.apply_torch(x, out=x if x.dtype == torch.float32 else None)
        return x, self._y[idx]

    def batches(self, order, batch_size):
        """``(x, y, idx)`` batches of ``order``; x and y on the source's device, idx on the CPU.

        A device-resident source copies ``order`` to the device once per call: a copy per
        batch would make the host wait for the device at every step.
        """
        batch_size = _check_batch_size(batch_size)
        order = torch.from_numpy(_as_order(order, len(self)))
        if self.pin:
            yield from self._pinned_batches(order, batch_size)
            return
        resident = order.to(self.x.device)
        for start in range(0, len(order), batch_size):
            x, y = self._take(resident[start:start + batch_size])
            yield x, y, order[start:start + batch_size]

    def _pinned_batches(self, order, batch_size):
        """Batches written into two alternating pinned buffers (index_select(out=...)).

        A buffer is refilled only after the CUDA work queued before the next request (the
        caller's non_blocking copy of that batch) has finished.
        """
        shape = (batch_size,) + tuple(self.x.shape[1:])
        slots = [{"x": torch.empty(shape, dtype=torch.float32, pin_memory=True),
                  "raw": (torch.empty(shape, dtype=self.x.dtype, pin_memory=True)
                          if self.x.dtype != torch.float32 else None),
                  "y": torch.empty(batch_size, dtype=torch.int64, pin_memory=True),
                  "event": None} for _ in range(2)]
        for k, start in enumerate(range(0, len(order), batch_size)):
            slot = slots[k % 2]
            if slot["event"] is not None:
                slot["event"].synchronize()
            idx = order[start:start + batch_size]
            b = len(idx)
            x, y = slot["x"][:b], slot["y"][:b]
            raw = x if slot["raw"] is None else slot["raw"][:b]
            torch.index_select(self.x, 0, idx, out=raw)
            torch.index_select(self.labels, 0, idx, out=y)
            self.normalization.apply_torch(raw, out=x)
            yield x, y, idx
            slot["event"] = torch.cuda.Event()
            slot["event"].record()

    def __repr__(self):
        return (f"TensorSource({len(self)} samples of {tuple(self.x.shape[1:])} {self.x.dtype} "
                f"on {self.x.device}, pin={self.pin})")


class StreamingSource:
    """A box of a split read lazily from the HDF5 file in chunk-aligned blocks of rows.

    A background thread reads the blocks ahead (a queue of ``prefetch`` blocks); at most
    ``prefetch + 2`` blocks are alive at once. Use with :meth:`epoch_order`, whose
    block-shuffled order reads every block once per epoch. Block size: ``block_rows`` (rounded
    up to whole chunks), else :func:`block_rows_for_budget` of ``memory_budget_gb`` shared by
    ``sources`` such sources, else about ``BLOCK_TARGET_BYTES``.
    """

    def __init__(self, path, split, box, block_rows=None, prefetch=2, memory_budget_gb=None,
                 sources=1):
        self.info = read_info(path)
        self.path = self.info.path
        if split not in self.info.splits:
            raise DatasetError(f"{self.path}: no split {split!r} in this data set "
                               f"(it has {list(self.info.splits)})")
        if int(prefetch) < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.split, self.prefetch = split, int(prefetch)
        self.box = as_box(box, self.info.spatial_shape, self.path)
        self.normalization = self.info.normalization
        self.sample_shape = (self.info.channels,) + tuple(s.stop - s.start for s in self.box)
        self.num_samples = self.info.splits[split]
        with open_h5(self.path) as f:
            chunk_rows = (h5_object(f, self.path, f"/{split}/images").chunks or (1,))[0]
            self.labels = torch.from_numpy(split_labels(f, split, self.path))
        sample_bytes = int(np.prod(self.sample_shape)) * self.info.itemsize
        if block_rows is None and memory_budget_gb is not None:
            block_rows = block_rows_for_budget(sample_bytes, chunk_rows,
                                               memory_budget_gb * GiB, sources, self.prefetch)
        wanted = block_rows or max(1, BLOCK_TARGET_BYTES // sample_bytes)
        whole = max(1, -(-self.num_samples // chunk_rows))  # chunks covering the split
        self.block_rows = min(whole, max(1, -(-int(wanted) // chunk_rows))) * chunk_rows
        self.num_blocks = -(-self.num_samples // self.block_rows)
        self.block_nbytes = self.block_rows * sample_bytes
        self.bytes_read = 0
        self.peak_blocks = 0  # most blocks alive at once (queued, held or being read)
        self.peak_queued = 0  # most blocks waiting in the prefetch queue at once
        self._alive = 0
        self._lock = threading.Lock()
        self._h5 = self._images = self._pid = None

    def __len__(self):
        return self.num_samples

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_h5=None, _images=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _dataset(self):
        """This process's read-only handle on the images, opened on first use."""
        if self._h5 is None or self._pid != os.getpid():
            h5 = open_h5(self.path)
            self._images = h5_object(h5, self.path, f"/{self.split}/images")
            self._h5, self._pid = h5, os.getpid()
        return self._images

    def close(self):
        """Close this process's file handle, if any (reopened on the next read)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._images = self._pid = None

    def _count(self, nbytes):
        self.bytes_read += nbytes

    def _alive_add(self, k, queued=0):
        with self._lock:
            self._alive += k
            self.peak_blocks = max(self.peak_blocks, self._alive)
            self.peak_queued = max(self.peak_queued, queued)

    def read_block(self, b):
        """Block ``b`` of the box in the stored dtype (rows ``b*block_rows`` onwards)."""
        rows = slice(b * self.block_rows, min(self.num_samples, (b + 1) * self.block_rows))
        images = self._dataset()
        with reading(self.path, f"/{self.split}/images"):
            x = _read_rows(images, rows, self.box, DEFAULT_BLOCK, self._count)
        return check_finite(x, self.path, self.split)

    def epoch_order(self, seed, epoch):
        """Blocks in a seeded random order; rows shuffled within windows of ``prefetch``
        consecutive blocks of that order. Reproducible from (seed, epoch)."""
        gen = seeded_generator(seed, epoch)
        blocks = torch.randperm(self.num_blocks, generator=gen)
        parts = []
        for w in range(0, self.num_blocks, self.prefetch):
            rows = torch.cat([torch.arange(b * self.block_rows,
                                           min(self.num_samples, (b + 1) * self.block_rows))
                              for b in blocks[w:w + self.prefetch].tolist()])
            parts.append(rows[torch.randperm(len(rows), generator=gen)])
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def _runs(self, order):
        """``(start, stop, blocks, new)``: stretches of ``order`` touching at most ``prefetch``
        distinct blocks (in order of first use); ``new``: those the previous run did not hold."""
        block_of = order // self.block_rows
        runs, start, blocks = [], 0, []
        for pos, b in enumerate(block_of.tolist()):
            if b not in blocks:
                if len(blocks) == self.prefetch:
                    runs.append((start, pos, blocks))
                    start, blocks = pos, []
                blocks.append(b)
        if blocks:
            runs.append((start, len(order), blocks))
        previous, out = [], []
        for start, stop, blocks in runs:
            out.append((start, stop, blocks, [b for b in blocks if b not in previous]))
            previous = blocks
        return out, block_of

    def batches(self, order, batch_size):
        """``(x, y, idx)`` batches of exactly the samples of ``order``, in that order (on the
        CPU). Orders from :meth:`epoch_order` read each block once; others may re-read."""
        batch_size = _check_batch_size(batch_size)
        order = _as_order(order, self.num_samples)
        runs, block_of = self._runs(order)
        reader = _BlockReader(self, [b for _, _, _, new in runs for b in new])
        buf = np.empty((batch_size,) + self.sample_shape, dtype=self.info.storage_dtype)
        filled, first, held = 0, 0, {}
        try:
            for start, stop, blocks, new in runs:
                keep = {b: held[b] for b in blocks if b in held}
                reader.release(len(held) - len(keep))
                held = keep
                for b in new:
                    held[b] = reader.get(b)
                pos = start
                while pos < stop:
                    take = min(stop - pos, batch_size - filled)
                    self._gather(buf[filled:filled + take], order[pos:pos + take],
                                 block_of[pos:pos + take], held)
                    filled, pos = filled + take, pos + take
                    if filled == batch_size:
                        yield self._emit(buf, order[first:pos])
                        filled, first = 0, pos
            if filled:
                yield self._emit(buf[:filled], order[first:])
        finally:
            reader.release(len(held))
            reader.stop()

    def _gather(self, out, rows, blocks_of_rows, held):
        for b, block in held.items():
            mask = blocks_of_rows == b
            if mask.any():
                out[mask] = block[rows[mask] - b * self.block_rows]

    def _emit(self, stored, idx):
        idx = torch.from_numpy(idx.copy())
        x = self.normalization.apply_torch(torch.from_numpy(stored))
        return x, self.labels[idx], idx

    def take(self, indices):
        """``(x normalised float32, y)`` of ``indices`` (any order; reads their blocks)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        xs = [x for x, _, _ in self.batches(idx, max(1, len(idx)))]
        x = xs[0] if xs else torch.empty((0,) + self.sample_shape)
        return x, self.labels[idx]

    def __repr__(self):
        return (f"StreamingSource({str(self.path)!r}, split={self.split!r}, box={self.box}, "
                f"{self.num_blocks} blocks of {self.block_rows} rows, prefetch={self.prefetch})")


class _BlockReader:
    """Background thread reading a list of blocks into a queue of at most ``prefetch``; it
    starts a read only while fewer than ``prefetch + 2`` blocks are alive."""

    def __init__(self, source, schedule):
        self.source, self.schedule = source, schedule
        self.queue = queue.Queue(maxsize=source.prefetch)
        self.permits = threading.Semaphore(source.prefetch + 2)
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="ddmpi-block-reader")
        self.thread.start()

    def _wait(self, call):
        """Retry ``call`` (a blocking step with a timeout) until it succeeds or we halt."""
        while not self.halt.is_set():
            if call():
                return True
        return False

    def _run(self):
        for b in self.schedule:
            if not self._wait(lambda: self.permits.acquire(timeout=0.1)):
                return
            self.source._alive_add(1)
            try:
                item = (b, self.source.read_block(b))
            except Exception as err:  # noqa: BLE001 - handed to the consumer, raised there
                item = (b, err)
            if not self._wait(lambda item=item: self._put(item)):
                self.release(1)
                return
            if isinstance(item[1], Exception):
                return

    def _put(self, item):
        try:
            self.queue.put(item, timeout=0.1)
        except queue.Full:
            return False
        self.source._alive_add(0, self.queue.qsize())
        return True

    def get(self, expected):
        """The next block, which must be ``expected`` (the schedule's order)."""
        b, block = self.queue.get()
        if isinstance(block, Exception):
            self.release(1)
            raise block
        assert b == expected, (b, expected)
        return block

    def release(self, k):
        """``k`` blocks the consumer held are dropped."""
        for _ in range(k):
            self.source._alive_add(-1)
            self.permits.release()

    def stop(self):
        """Stop the thread and drop what it queued."""
        self.halt.set()
        self.thread.join()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
            self.release(1)


def box_nbytes(info, split, box):
    """Stored bytes of ``box`` of all samples of ``split`` (what a TensorSource would hold)."""
    if split not in info.splits:
        raise DatasetError(f"{info.path}: no split {split!r} in this data set "
                           f"(it has {list(info.splits)})")
    box = as_box(box, info.spatial_shape, info.path)
    per_sample = info.channels * int(np.prod([s.stop - s.start for s in box]))
    return info.splits[split] * per_sample * info.itemsize


def open_source(path, split, box, in_memory="auto", memory_budget_gb=2.0, pin=False, **stream):
    """A :class:`TensorSource` (in memory) or :class:`StreamingSource` of ``box`` of ``split``.

    ``"auto"``: in memory when the box's stored bytes of this split fit ``memory_budget_gb``
    (the budget of this one call; see :func:`open_splits` for several splits). Streamed: blocks
    sized to the budget (``block_rows`` in ``stream`` overrides).
    """
    if in_memory not in (True, False, "auto"):
        raise ValueError(f"in_memory must be True, False or 'auto', got {in_memory!r}")
    info = read_info(path)
    if split not in info.splits:
        raise DatasetError(f"{info.path}: no split {split!r} in this data set "
                           f"(it has {list(info.splits)})")
    if in_memory == "auto":
        in_memory = box_nbytes(info, split, box) <= memory_budget_gb * 1024 ** 3
    if not in_memory:
        return StreamingSource(path, split, box, **{"memory_budget_gb": memory_budget_gb,
                                                    **stream})
    x, y = read_box(path, split, box)
    return TensorSource(torch.from_numpy(x), torch.from_numpy(y), info.normalization,
                        as_box(box, info.spatial_shape, info.path), pin=pin)


def open_splits(path, box, splits=None, in_memory="auto", memory_budget_gb=2.0, pin=False,
                **stream):
    """``{split: source}`` for ``splits`` (default: all in the file) sharing one budget.

    ``box``: one box, or ``{split: box}``. ``"auto"``: splits are taken into memory smallest
    first while their summed stored bytes fit ``memory_budget_gb``; the rest stream, sharing
    what is left of it (:func:`block_rows_for_budget`).
    """
    if in_memory not in (True, False, "auto"):
        raise ValueError(f"in_memory must be True, False or 'auto', got {in_memory!r}")
    info = read_info(path)
    splits = [s for s in SPLITS if s in info.splits] if splits is None else list(splits)
    boxes = {s: box[s] if isinstance(box, dict) else box for s in splits}
    sizes = {s: box_nbytes(info, s, boxes[s]) for s in splits}
    left = memory_budget_gb * GiB
    decided = {}
    for s in sorted(splits, key=sizes.get):
        fits = in_memory is True or (in_memory == "auto" and sizes[s] <= left)
        decided[s] = bool(fits)
        left -= sizes[s] if fits else 0
    streamed = {**stream, "sources": sum(not d for d in decided.values()) or 1}
    try:
        return {s: open_source(path, s, boxes[s], decided[s], left / GiB, pin=pin, **streamed)
                for s in splits}
    except ConfigError as err:
        held = [s for s in splits if decided[s]]
        if not held:
            raise
        raise ConfigError(f"{err}; that is what is left after {', '.join(held)} in memory "
                          f"({(memory_budget_gb * GiB - left) / 2 ** 20:.1f} MiB)") from None
