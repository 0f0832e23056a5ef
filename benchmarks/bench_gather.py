"""Gather of the local decisions to rank 0: time and rank 0's memory against S x N x K.

    mpirun -n 4 --oversubscribe python benchmarks/bench_gather.py
    mpirun -n 4 --oversubscribe python benchmarks/bench_gather.py --S 4 16 64 --K 10 100 1000 \
        --N 1000 10000 100000 --chunk-mb 1 64 --budget-gib 1 --repeat 3 --json gather.json

For every combination of S subdomains (spread over the ranks as ``ddmpi train`` spreads them,
several per rank when S > P), K classes and N samples, every rank fills its ``{subdomain: (N, K)
float32}`` decisions and calls :meth:`ddmpi.parallel.group.Group.gather_decisions` with each
``--chunk-mb``
(``run.gather_chunk_mb``; the default of ddmpi is 64), and rank 0 prints

- the wall time of the gather (after a barrier, the slowest rank of each repeat; median of
  ``--repeat`` with the range min..max) and the rate in GiB/s of the gathered array (at the
  median);
- rank 0's memory during the gather: the peak of the numpy heap (``tracemalloc``, which numpy
  reports its buffers to) above what was allocated before, and the growth of the process's
  peak resident set (``VmHWM`` of ``/proc/self/status``, reset before each gather through
  ``/proc/self/clear_refs``; where that is not allowed, the ``ru_maxrss`` delta, which only
  grows), next to the model result + own send buffer + receive chunk(s) of
  ``gather_decisions``;
- the same for a prototype of the design that keeps rank 0 bounded (``--stream``, on by
  default): the same Gatherv of sample chunks, sized so that the whole receive chunk (not
  each sender's part) is at most ``--stream-chunk-mb``, each chunk written to an HDF5 data set
  ``(N, S*K)`` on rank 0 (one row = one input vector of the coarse DNN, so its mini-batches are
  contiguous reads) instead of kept in memory.

Combinations whose gathered array S*N*K*4 bytes exceeds ``--budget-gib`` are skipped and
listed (memory of the whole node: the ranks' decisions and send buffers, about 2x the array,
plus rank 0's result and receive chunk). Every gathered array is checked (subdomain s holds s).
"""

import argparse
import gc
import json
import os
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from mpi4py import MPI

from ddmpi.parallel.group import Group
from ddmpi.parallel.layout import assign_subdomains

MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------------------------------------
# memory of this process
# ---------------------------------------------------------------------------------------------

def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim():
    """Give memory that glibc keeps after frees back to the system, so that RSS growth during
    the next block is not hidden by reused pages (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss():
    """Reset the kernel's peak RSS of this process (VmHWM); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class MemoryProbe:
    """Peak numpy heap (tracemalloc) and peak RSS growth of this process over a block."""

    def __init__(self):
        tracemalloc.start()

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        self.hwm = reset_peak_rss()
        self.rss0 = _status_kib("VmRSS") if self.hwm else None
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.reset_peak()
        self.heap0 = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc):
        self.heap_peak = tracemalloc.get_traced_memory()[1] - self.heap0
        if self.hwm:
            self.rss_peak = (_status_kib("VmHWM") - self.rss0) * 1024
            self.rss_kind = "VmHWM"
        else:
            self.rss_peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                             - self.maxrss0) * 1024
            self.rss_kind = "ru_maxrss delta"
        return False


# ---------------------------------------------------------------------------------------------
# the design that keeps rank 0 bounded: stream sample chunks into an HDF5 file on rank 0
# ---------------------------------------------------------------------------------------------

def stream_to_hdf5(comm, local, num_subdomains, path, chunk_bytes):
    """Gatherv sample chunks of ``{subdomain: (N, K)}`` and write them on rank 0 to ``path``
    (data set ``decisions``, ``(N, S*K)`` float32, row n = sample n's decisions of subdomains
    0..S-1). The whole receive chunk is at most ``chunk_bytes`` (at least one sample), so rank
    0 holds O(chunk_bytes) whatever S, N and P. Returns the path on rank 0, None elsewhere."""
    import h5py

    owned = sorted(local)
    n, k = np.shape(local[owned[0]]) if owned else (0, 0)
    meta = comm.allgather((owned, (n, k) if owned else None))
    n, k = next(shape for _, shape in meta if shape is not None)
    order = np.array([s for subs, _ in meta for s in subs])
    counts = [len(subs) for subs, _ in meta]
    rows = max(1, chunk_bytes // (4 * k * num_subdomains))  # the whole receive chunk
    f = dset = None
    if comm.rank == 0:
        f = h5py.File(path, "w")
        dset = f.create_dataset("decisions", (n, num_subdomains * k), np.float32,
                                chunks=(min(n, max(1, (1 << 20) // (4 * num_subdomains * k))),
                                        num_subdomains * k))
    rows = min(rows, n)
    send_buf = np.empty(len(owned) * rows * k, np.float32)  # allocated once, reused
    if comm.rank == 0:
        recv_buf = np.empty(num_subdomains * rows * k, np.float32)
        rows_buf = np.empty(rows * num_subdomains * k, np.float32)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        m = stop - start
        chunk = send_buf[:len(owned) * m * k].reshape(len(owned), m, k)
        for i, s in enumerate(owned):
            chunk[i] = local[s][start:stop]
        recv = None
        if comm.rank == 0:
            recv_chunk = recv_buf[:num_subdomains * m * k].reshape(num_subdomains, m, k)
            sizes = [c * m * k for c in counts]
            recv = [recv_chunk, sizes, np.cumsum([0] + sizes[:-1]).tolist(), MPI.FLOAT]
        comm.Gatherv([chunk, MPI.FLOAT], recv, root=0)
        if comm.rank == 0:
            # (S, rows, K) in receive order -> (rows, S, K) in subdomain order
            rows_out = rows_buf[:m * num_subdomains * k].reshape(m, num_subdomains, k)
            for position, sub in enumerate(order):
                rows_out[:, sub] = recv_chunk[position]
            dset[start:stop] = rows_out.reshape(m, -1)
    if f is not None:
        f.close()
        return path
    return None


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------

def model_bytes(s, n, k, p, chunk_bytes):
    """gather_decisions' buffers on rank 0: result + own send buffer + receive buffer (one,
    reused; at most ``chunk_bytes``) + the contiguous copy of its own part of a chunk."""
    c0 = len(assign_subdomains(s, p)[0])
    rows = min(n, max(1, chunk_bytes // (4 * k * s)))
    # a rank with several subdomains copies each chunk of its send buffer (non-contiguous
    # slice); the previous chunk's copy is still referenced while the next one is made
    own_copy = 2 * c0 * rows if (c0 > 1 and rows < n) else 0
    return 4 * k * (s * n + c0 * n + s * rows + own_copy), 4 * k * s * rows


def timed(comm, func, repeat, probe):
    """Wall times of ``func`` (slowest rank of each of ``repeat`` runs); memory of the last."""
    times, result = [], None
    for _ in range(repeat):
        result = None
        comm.Barrier()
        if probe is not None:
            with probe:
                t0 = time.perf_counter()
                result = func()
                seconds = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            result = func()
            seconds = time.perf_counter() - t0
        times.append(comm.allreduce(seconds, op=MPI.MAX))
    return times, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--S", type=int, nargs="+", default=[4, 16, 64], help="subdomains")
    parser.add_argument("--K", type=int, nargs="+", default=[10, 100, 1000], help="classes")
    parser.add_argument("--N", type=int, nargs="+", default=[1000, 10000, 100000],
                        help="samples")
    parser.add_argument("--chunk-mb", type=int, nargs="+", default=[1, 64],
                        help="gather_chunk_mb values (ddmpi's default: 64)")
    parser.add_argument("--budget-gib", type=float, default=1.0,
                        help="skip combinations whose gathered array S*N*K*4 exceeds this")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-stream", dest="stream", action="store_false",
                        help="leave out the streamed-to-HDF5 prototype")
    parser.add_argument("--stream-chunk-mb", type=int, default=16,
                        help="receive chunk of the streamed prototype (all senders together)")
    parser.add_argument("--tmp", default=None, help="folder of the streamed HDF5 file")
    parser.add_argument("--json", type=Path, help="write all rows as JSON (rank 0)")
    args = parser.parse_args(argv)

    comm = MPI.COMM_WORLD
    group = Group(comm)
    rank, p = comm.rank, comm.size
    import h5py  # imported before any timing

    probe = MemoryProbe() if rank == 0 else None
    tmpdir = tempfile.mkdtemp(prefix="bench_gather_", dir=args.tmp) if rank == 0 else None
    if rank == 0:
        hwm = reset_peak_rss()
        print(f"{p} ranks on {os.cpu_count()} cores (load average "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}); rank 0 peak RSS from "
              f"{'VmHWM (reset per gather)' if hwm else 'ru_maxrss deltas (monotonic)'}; "
              f"budget {args.budget_gib:g} GiB for S*N*K*4; median (min..max) of {args.repeat}",
              flush=True)
        print(f"{'S':>4} {'S/P':>4} {'K':>5} {'N':>7} {'array MiB':>9} {'method':>12} "
              f"{'s med':>8} {'s range':>15} {'GiB/s':>6} {'heap MiB':>9} {'RSS MiB':>8} "
              f"{'model MiB':>9} "
              f"{'recv MiB':>8} {'heap/arr':>8}")
    rows, skipped = [], []
    for s in args.S:
        if s < p:
            skipped.append((s, None, None, f"fewer subdomains than the {p} ranks"))
            continue
        owned = assign_subdomains(s, p)[rank]
        for k in args.K:
            for n in args.N:
                nbytes = 4 * s * n * k
                if nbytes > args.budget_gib * GiB:
                    skipped.append((s, k, n, f"{nbytes / GiB:.2f} GiB > budget"))
                    continue
                local = {sub: np.full((n, k), float(sub), np.float32) for sub in owned}
                methods = [(f"chunk {mb} MiB", mb) for mb in args.chunk_mb]
                if args.stream:
                    methods.append((f"stream {args.stream_chunk_mb} MiB", None))
                for name, mb in methods:
                    if mb is not None:
                        def func():
                            return group.gather_decisions(local, s, chunk_bytes=mb * MiB)
                    else:
                        path = os.path.join(tmpdir, "decisions.h5") if rank == 0 else None

                        def func():
                            return stream_to_hdf5(comm, local, s, path,
                                                  args.stream_chunk_mb * MiB)
                    times, result = timed(comm, func, args.repeat, probe)
                    seconds = float(np.median(times))
                    if rank != 0:
                        continue
                    if mb is not None:
                        ok = (result.shape == (s, n, k)
                              and np.array_equal(result[:, [0, -1], [0, -1]],
                                                 np.repeat(np.arange(s, dtype=np.float32)[:, None],
                                                           2, 1)))
                        model, recv = model_bytes(s, n, k, p, mb * MiB)
                    else:
                        with h5py.File(result, "r") as f:
                            d = f["decisions"]
                            ok = d.shape == (n, s * k) and np.array_equal(
                                d[[0, n - 1]].reshape(2, s, k)[:, :, 0],
                                np.tile(np.arange(s, dtype=np.float32), (2, 1)))
                        rws = max(1, args.stream_chunk_mb * MiB // (4 * k * s))
                        recv = 4 * k * s * min(n, rws)
                        c0 = len(assign_subdomains(s, p)[0])
                        model = 2 * recv + recv * c0 // s
                        os.remove(result)
                    if not ok:
                        raise SystemExit(f"wrong gathered decisions for S={s} K={k} N={n}")
                    row = dict(S=s, per_rank=s / p, K=k, N=n, array_bytes=nbytes, method=name,
                               seconds=seconds, seconds_all=times, gib_per_s=nbytes / GiB / seconds,
                               heap_peak=probe.heap_peak, rss_peak=probe.rss_peak,
                               rss_kind=probe.rss_kind, model_bytes=model, recv_chunk=recv)
                    rows.append(row)
                    print(f"{s:>4} {s / p:>4g} {k:>5} {n:>7} {nbytes / MiB:9.1f} {name:>12} "
                          f"{seconds:8.3f} {min(times):7.3f}..{max(times):<6.3f} "
                          f"{row['gib_per_s']:6.2f} "
                          f"{probe.heap_peak / MiB:9.1f} {probe.rss_peak / MiB:8.1f} "
                          f"{model / MiB:9.1f} {recv / MiB:8.1f} "
                          f"{probe.heap_peak / nbytes:8.2f}", flush=True)
                    del result
                local = None  # free the decisions before the next size (func holds only the name)
                gc.collect()
    if rank == 0:
        if skipped:
            print("skipped: " + "; ".join(
                f"S={s}" + (f" K={k} N={n}" if k else "") + f" ({why})"
                for s, k, n, why in skipped))
        print("heap = rank 0's numpy/Python heap peak during the call; RSS = growth of its "
              "peak resident set (after malloc_trim); model = result + own send buffer + receive "
              "chunk(s) + copy of its own part of a chunk "
              "(stream: receive chunk + its reordered copy + own part of the chunk)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"ranks": p, "rows": rows, "skipped": skipped},
                                            indent=1))
        os.rmdir(tmpdir)
    return rows


if __name__ == "__main__":
    main()
