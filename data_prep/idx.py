"""IDX files (the MNIST container format), raw or gzip-compressed, fully validated.

An IDX file is: two zero bytes, a type code, the number of dimensions ``n``, ``n`` big-endian
uint32 sizes, then the array in C order, big-endian. Its size must match the header exactly.
"""

import gzip
import math
import struct
import zlib

import numpy as np

from data_prep.errors import PrepError

TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path):
    """The array stored in an IDX file (``.gz`` or raw, detected from the bytes, not the name)."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in TYPES or raw[3] == 0:
        raise PrepError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise PrepError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions "
                        f"need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(TYPES[raw[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) < expected:
        raise PrepError(f"{path}: truncated: {len(raw)} bytes, but its header declares "
                        f"{dtype.name} {'x'.join(map(str, dims))} ({expected} bytes)")
    if len(raw) > expected:
        raise PrepError(f"{path}: {len(raw) - expected} bytes beyond the "
                        f"{'x'.join(map(str, dims))} array its header declares")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise PrepError(f"{path}: cannot read ({err.strerror or err})") from err
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise PrepError(f"{path}: corrupt or truncated gzip data ({err})") from err
