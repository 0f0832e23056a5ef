"""Gather of the local decisions to rank 0: buffer-based ``Gatherv``, chunked, in subdomain order.

Ownership: ``comm`` is the communicator whose ranks own the subdomains (``COMM_WORLD`` in a
decomposed run, the group leaders in a hybrid one); every rank of it must call
:func:`gather_decisions` with the same sample count and class count. Only rank 0 of ``comm``
receives the result. Decisions travel as raw float32 buffers, never as pickled objects; a split
with many samples is sent in chunks of samples so that rank 0's receive buffer (reused from
chunk to chunk) never exceeds ``chunk_bytes``.
"""

import numpy as np
from mpi4py import MPI


def gather_decisions(comm, local, num_subdomains, chunk_bytes=64 << 20):
    """Gather ``{subdomain: (N, K) float32}`` from every rank; rank 0 gets (S, N, K), others None.

    Raises on rank 0 if the ranks disagree on N or K, or if some subdomain is missing or owned
    twice (each rank checks its own shapes first, so a mismatch cannot deadlock the collective).
    """
    owned = sorted(local)
    shapes = {np.shape(local[s]) for s in owned}
    if len(shapes) > 1:
        raise ValueError(f"rank {comm.rank}: local decisions of different shapes {shapes}")
    meta = comm.allgather((owned, shapes.pop() if shapes else None))
    all_shapes = {shape for _, shape in meta if shape is not None}
    if len(all_shapes) != 1:
        raise ValueError(f"ranks hold local decisions of different shapes: {sorted(all_shapes)}")
    n, k = all_shapes.pop()
    order = [s for subs, _ in meta for s in subs]
    if sorted(order) != list(range(num_subdomains)):
        raise ValueError(f"subdomains owned by the ranks {order} are not exactly "
                         f"0..{num_subdomains - 1}")
    sendbuf = (np.stack([np.asarray(local[s], dtype=np.float32) for s in owned])
               if owned else np.empty((0, n, k), np.float32))
    counts = [len(subs) for subs, _ in meta]
    # Rank 0 receives S * rows * K floats per chunk: that, not each sender's part, is bounded.
    rows_per_chunk = max(1, min(n, chunk_bytes // (4 * k * num_subdomains)))
    result, recv_buffer = None, None
    if comm.rank == 0:
        result = np.empty((num_subdomains, n, k), np.float32)
        recv_buffer = np.empty(num_subdomains * rows_per_chunk * k, np.float32)  # reused
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        chunk = np.ascontiguousarray(sendbuf[:, start:stop])
        recv = None
        if comm.rank == 0:
            recv_chunk = recv_buffer[:num_subdomains * (stop - start) * k].reshape(
                num_subdomains, stop - start, k)
            sizes = [c * (stop - start) * k for c in counts]
            recv = [recv_chunk, sizes, np.cumsum([0] + sizes[:-1]).tolist(), MPI.FLOAT]
        comm.Gatherv([chunk, MPI.FLOAT], recv, root=0)
        if comm.rank == 0:
            result[order, start:stop] = recv_chunk
    return result
