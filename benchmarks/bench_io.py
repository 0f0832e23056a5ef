"""I/O of the per-rank subdomain reader: bytes read from the file per subdomain, and time.

    python benchmarks/bench_io.py                       # real MNIST test split (10,000 digits)
    python benchmarks/bench_io.py --data FILE.h5 --split train --grids 2x2:2 4x4:2

For every subdomain of each grid it reads the split's subdomain the way a rank does
(:func:`ddmpi.data.reader.load_subdomain`: block-wise hyperslabs of whole chunks) through a file
object that counts the bytes HDF5 asks for, and prints them against the split's image bytes.
``--lazy-batches B`` also times random batches of ``B`` samples read on demand
(:class:`ddmpi.data.reader.SubdomainDataset` with ``in_memory=False``). Times are the median
of ``--repeat`` reads with their range (min..max); ``--dtype uint8`` writes the converted sets
in 8-bit storage (format v2), whose bytes are counted with their own item size.

Without ``--data`` it converts ``--src`` (MNIST IDX .gz, default ``mnist-test10k`` under
``$DDMPI_SHARED_DATA``, else under ``../shared/data``) into a temporary ddmpi data set (seeded
8,000 / 1,000 / 1,000 split) with a few lines of numpy, and with ``--3d`` also builds a 3D set
of real digits stacked 16 deep (1,000 x 16x28x28).
Acceptance: one rank's bytes for one subdomain of a 2x2 grid with overlap 2 <= ~1/3 of the
split's image bytes.
"""

import argparse
import contextlib
import gzip
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from _paths import SHARED_DATA

DEFAULT_SRC = SHARED_DATA / "mnist-test10k"


class CountingFile(io.RawIOBase):
    """A read-only file object that counts the bytes read through it (for ``h5py.File``)."""

    def __init__(self, raw):
        super().__init__()
        self.raw = raw
        self.bytes_read = 0
        self.reads = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        n = self.raw.readinto(buffer)
        self.bytes_read += n or 0
        self.reads += 1
        return n

    def read(self, size=-1):
        data = self.raw.read(size)
        self.bytes_read += len(data)
        self.reads += 1
        return data

    def seek(self, offset, whence=io.SEEK_SET):
        return self.raw.seek(offset, whence)

    def tell(self):
        return self.raw.tell()


@contextlib.contextmanager
def counting_reader():
    """Make :mod:`ddmpi.data.reader` open files through :class:`CountingFile`s; yields their list."""
    from ddmpi.data import reader

    opened = []

    def open_counting(path):
        counter = CountingFile(open(path, "rb"))
        opened.append(counter)
        return h5py.File(counter, "r")

    original = reader.open_h5
    reader.open_h5 = open_counting
    try:
        yield opened
    finally:
        reader.open_h5 = original
        for counter in opened:
            counter.raw.close()


def read_idx(path):
    """An IDX array (MNIST format) from a .gz file."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def convert_mnist(src, out, depth=None, n3d=1000, dtype="float32"):
    """Write the MNIST IDX files in ``src`` as a ddmpi data set (seeded 80/10/10 split).

    ``depth``: stack that many consecutive digits into one (1, depth, 28, 28) volume
    (``n3d`` volumes, labelled by the middle digit) to benchmark a 3D layout on real pixels.
    """
    from ddmpi.data.schema import DatasetWriter

    src = Path(src)
    images = next(src.glob("*images-idx3-ubyte.gz"))
    labels = next(src.glob("*labels-idx1-ubyte.gz"))
    x = read_idx(images).astype(np.float32) / 255.0
    y = read_idx(labels).astype(np.int64)
    if depth:
        n = min(n3d, len(x) // depth)
        x = x[:n * depth].reshape(n, depth, 28, 28)[:, None]
        y = y[:n * depth].reshape(n, depth)[:, depth // 2]
    else:
        x = x[:, None]
    order = np.random.default_rng(0).permutation(len(x))
    n_train, n_val = int(0.8 * len(x)), int(0.1 * len(x))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    with DatasetWriter(out, name="mnist3d" if depth else "mnist", classes=list(range(10)),
                       converter="benchmarks.bench_io",
                       provenance={"source": str(src), "depth": depth}, dtype=dtype) as writer:
        for split, idx in parts.items():
            writer.write_split(split, x[np.sort(idx)], y[np.sort(idx)])
    return Path(out)


_SCHEMA_CHUNK_SHAPE = None  # the schema's own chunk_shape while chunk_layout("even") is active


def even_chunk_shape(n_samples, channels, spatial_shape, itemsize=4):
    """The schema's chunks with the sample extent evened out over the chunk rows
    (ceil(N / ceil(N / S)) instead of S), so the last chunk row carries no padding.
    HDF5 stores (and a rank reads) every chunk at full size, also past the end of the data."""
    chunks = _SCHEMA_CHUNK_SHAPE(n_samples, channels, spatial_shape, itemsize)
    rows = -(-n_samples // chunks[0])
    return (-(-n_samples // rows),) + tuple(chunks[1:])


@contextlib.contextmanager
def chunk_layout(layout):
    """Write with the schema's chunks (``"schema"``) or :func:`even_chunk_shape` (``"even"``)."""
    from ddmpi.data import schema

    global _SCHEMA_CHUNK_SHAPE
    original = _SCHEMA_CHUNK_SHAPE = schema.chunk_shape
    if layout == "even":
        schema.chunk_shape = even_chunk_shape
    try:
        yield
    finally:
        schema.chunk_shape = original


def parse_grid_spec(spec):
    """``"2x2:2"`` -> (grid string, overlap)."""
    grid, _, overlap = spec.partition(":")
    return grid, int(overlap or 0)


def tiles_touched(dec, sub, chunks):
    """Fraction of the spatial chunk tiles that a subdomain's slices intersect."""
    frac = 1.0
    for sl, n, t in zip(dec.slices(sub), dec.image_shape, chunks[2:]):
        first, last = sl.start // t, (sl.stop - 1) // t
        frac *= (last - first + 1) / -(-n // t)
    return frac


def rchar():
    """Bytes this process has read through read()/pread() so far (Linux), else None."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar"))
    except (OSError, StopIteration):
        return None


def bench_file(path, split, specs, lazy_batches=0, rng=None, repeat=3):
    from ddmpi.data.decomposition import Decomposition
    from ddmpi.data.reader import SubdomainDataset, load_subdomain
    from ddmpi.data.schema import read_info

    info = read_info(path)
    with h5py.File(path, "r") as f:
        dset = f[split]["images"]
        chunks, n = dset.chunks, dset.shape[0]
    item = info.itemsize
    image_bytes = n * info.channels * int(np.prod(info.spatial_shape)) * item
    print(f"\n{path.name}: split {split!r}, {n} samples of {info.channels}x"
          f"{'x'.join(map(str, info.spatial_shape))} {info.storage_dtype} = "
          f"{image_bytes / 2**20:.2f} MiB of images; chunks {chunks} "
          f"({np.prod(chunks) * item / 1024:.0f} KiB)")
    print("  read = bytes HDF5 reads for load_subdomain (counting file object; data, labels and "
          "the metadata it needs);\n  rchar = all bytes the process read (real file, incl. "
          "read_info's validation); own = the subdomain's bytes; tiles = chunk tiles touched")
    print(f"{'grid':>8} {'ov':>3} {'sub':>10} {'shape':>10} {'own MiB':>8} {'read MiB':>9} "
          f"{'read/all':>9} {'rchar/all':>9} {'own/all':>8} {'tiles':>6} {'reads':>6} "
          f"{'ms med':>7} {'ms range':>13} {'MiB/s':>7}")
    rows = []
    for spec in specs:
        grid, overlap = parse_grid_spec(spec)
        try:
            dec = Decomposition(info.spatial_shape, grid, overlap)
        except ValueError as err:
            print(f"{grid:>8} {overlap:>3}  skipped: {err}")
            continue
        for sub in dec:
            own = n * info.channels * int(np.prod(dec.subdomain_shape(sub))) * item
            with counting_reader() as counters:
                load_subdomain(path, split, dec, sub)
            read = sum(c.bytes_read for c in counters)
            times = []
            for _ in range(max(1, repeat)):
                r0 = rchar()
                t0 = time.perf_counter()
                x, _ = load_subdomain(path, split, dec, sub)  # the real path (sec2 driver)
                times.append(time.perf_counter() - t0)
                real = rchar() - r0 if r0 is not None else float("nan")
                del x
            seconds = float(np.median(times))
            row = dict(file=path.name, split=split, grid=grid, overlap=overlap, subdomain=sub,
                       index=dec.index(sub), shape=dec.subdomain_shape(sub), own_bytes=own,
                       bytes_read=read, rchar=real, image_bytes=image_bytes,
                       ratio=read / image_bytes, rchar_ratio=real / image_bytes,
                       own_ratio=own / image_bytes, tiles=tiles_touched(dec, sub, chunks),
                       reads=sum(c.reads for c in counters), seconds=seconds,
                       seconds_all=times)
            rows.append(row)
            print(f"{grid:>8} {overlap:>3} {str(dec.index(sub)):>10} "
                  f"{'x'.join(map(str, row['shape'])):>10} {own / 2**20:8.2f} "
                  f"{read / 2**20:9.2f} {row['ratio']:9.4f} {row['rchar_ratio']:9.4f} "
                  f"{row['own_ratio']:8.4f} {row['tiles']:6.3f} {row['reads']:6d} "
                  f"{seconds * 1e3:7.1f} {min(times) * 1e3:6.1f}..{max(times) * 1e3:<6.1f}"
                  f"{own / 2**20 / seconds:7.0f}")
        if lazy_batches:
            sub = dec.num_subdomains - 1
            with counting_reader() as counters:
                ds = SubdomainDataset(path, split, dec, sub, in_memory=False)
                ds[0]  # open the file
                start = sum(c.bytes_read for c in counters)
                batches = [rng.choice(n, lazy_batches, replace=False) for _ in range(5)]
                times = []
                for idx in batches:
                    t0 = time.perf_counter()
                    ds.read_block(idx)
                    times.append(time.perf_counter() - t0)
                seconds = float(np.median(times))
                read = (sum(c.bytes_read for c in counters) - start) / len(batches)
                ds.close()
            own = lazy_batches * info.channels * int(np.prod(dec.subdomain_shape(sub))) * item
            print(f"{grid:>8} {overlap:>3} {'lazy':>10} random batch of {lazy_batches} from "
                  f"subdomain {dec.index(sub)}: {read / 2**10:.1f} KiB read for "
                  f"{own / 2**10:.1f} KiB of samples, {seconds * 1e3:.1f} ms/batch (median of "
                  f"{len(times)}, {min(times) * 1e3:.1f}..{max(times) * 1e3:.1f}; through the "
                  f"counting file object)")
            rows.append(dict(file=path.name, split=split, grid=grid, overlap=overlap,
                             subdomain=sub, lazy_batch=lazy_batches, bytes_read=read,
                             own_bytes=own, seconds=seconds, seconds_all=times))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="prepared ddmpi data set (.h5)")
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC,
                        help="MNIST IDX folder converted when --data is not given "
                        "(default: %(default)s; $DDMPI_SHARED_DATA overrides ../shared/data)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--grids", nargs="+", default=["2x2:2", "4x4:2"],
                        help="grids as GRID:OVERLAP (default: 2x2:2 4x4:2)")
    parser.add_argument("--3d", dest="three_d", action="store_true",
                        help="also a 3D set (real digits stacked 16 deep), grid 2x2x2:2")
    parser.add_argument("--lazy-batches", type=int, default=0, metavar="B",
                        help="also read random batches of B samples on demand")
    parser.add_argument("--layout", choices=["schema", "even"], default="schema",
                        help="chunks of the converted sets: the schema's, or with the sample "
                             "extent evened out over the chunk rows (no padded last row)")
    parser.add_argument("--dtype", choices=["float32", "uint8"], default="float32",
                        help="storage of the converted sets (default float32)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed reads of each subdomain (median and range reported)")
    parser.add_argument("--json", type=Path, help="write all rows as JSON")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_io_") as tmp:
        data = args.data
        if data is None:
            if not args.src.is_dir():
                sys.exit(f"{args.src}: MNIST folder not found; give --data FILE.h5 or --src DIR")
            with chunk_layout(args.layout):
                data = convert_mnist(args.src, Path(tmp) / "mnist.h5", dtype=args.dtype)
        rows += bench_file(data, args.split, args.grids, args.lazy_batches, rng, args.repeat)
        if args.three_d:
            if not args.src.is_dir():
                sys.exit(f"{args.src}: MNIST folder not found for the 3D set")
            with chunk_layout(args.layout):
                vol = convert_mnist(args.src, Path(tmp) / "mnist3d.h5", depth=16,
                                    dtype=args.dtype)
            rows += bench_file(vol, args.split, ["2x2x2:2"], args.lazy_batches, rng,
                               args.repeat)
    main_rows = [r for r in rows if r.get("grid") == "2x2" and r.get("overlap") == 2
                 and "lazy_batch" not in r]
    if main_rows:
        worst = max(r["ratio"] for r in main_rows)
        verdict = "meets" if worst <= 1 / 3 else "misses"
        print(f"\nacceptance: largest bytes-read ratio of a 2x2 overlap-2 subdomain = "
              f"{worst:.4f} ({verdict} <= 1/3; the subdomain itself is "
              f"{main_rows[0]['own_ratio']:.4f})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
