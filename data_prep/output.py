"""Write converted arrays through ``ddmpi.data.schema.DatasetWriter`` (atomic: all or nothing)."""

import numpy as np

from data_prep.errors import PrepError
from data_prep.splits import check_disjoint_groups
from ddmpi.data.schema import SPLITS, DatasetWriter


def write_dataset(out, *, name, classes, converter, provenance, images, labels, parts,
                  groups=None, ids=None, dtype="float32"):
    """Write ``images[parts[split]]`` etc. for each split; return a one-line summary.

    ``images`` (N, C, *spatial): uint8 (value / 255) or float in [0, 1]; converted split by
    split to the storage ``dtype`` (float32, or uint8 = round(x * 255)). ``groups`` and ``ids``
    are optional (N,) strings; with ``groups`` no group may appear in two splits.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if groups is not None:
        groups = np.asarray(groups, dtype=str)
        check_disjoint_groups(parts, groups)
    ids = None if ids is None else np.asarray(ids, dtype=str)
    provenance = {**provenance, "splits": {s: int(len(i)) for s, i in parts.items()},
                  "storage_dtype": dtype}
    with DatasetWriter(out, name=name, classes=classes, converter=converter,
                       provenance=provenance, dtype=dtype) as writer:
        for split in SPLITS:
            idx = parts.get(split)
            if idx is None or len(idx) == 0:
                continue
            x = images[idx]
            if x.dtype != np.uint8 and not (np.all(x >= 0) and np.all(x <= 1)):
                raise PrepError(f"{out}: split {split!r}: image values outside [0, 1] or not "
                                f"finite (converter bug)")
            writer.write_split(split, x, labels[idx],
                               groups=None if groups is None else groups[idx],
                               ids=None if ids is None else ids[idx])
    shape = "x".join(str(s) for s in images.shape[1:])
    counts = ", ".join(f"{s} {len(parts[s])}" for s in SPLITS if len(parts.get(s, ())))
    return f"wrote {out}: {counts} samples of {shape}, {len(classes)} classes"
