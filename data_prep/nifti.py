"""NIfTI volumes (.nii, .nii.gz via nibabel) -> (N, 1, D, H, W) in [0, 1].

Axes, windowing and resampling: docs/dataset-format.md; the single-file loaders live in
:mod:`ddmpi.data.inputs`. ``--shape`` is given in NIfTI (x, y, z) order.
"""

from pathlib import Path

from data_prep import fileset, sources
from data_prep.errors import PrepError
from data_prep.splits import SplitOptions
from ddmpi.data.inputs import NIFTI_SUFFIXES as SUFFIXES  # noqa: F401
from ddmpi.data.inputs import is_nifti, prepare, read_canonical


def convert(out, *, src=None, manifest=None, image_column="image", label_column="label",
            group_column=None, classes=None, shape_xyz=None, window=None,
            split_column=None, split_options=SplitOptions(), name=None, dtype="float32"):
    """Convert labelled NIfTI volumes to ``out``; return a one-line summary.

    Sources: class sub-folders of ``src`` or a CSV ``manifest`` (paths relative to it; with
    ``group_column`` the splits are grouped, e.g. by patient). ``shape_xyz`` None requires all
    volumes to have one canonical shape.
    """
    if window is not None and not window[0] < window[1]:
        raise PrepError(f"window {window[0]} {window[1]}: the lower bound must be below the upper")
    records = sources.collect(is_nifti, src=src, manifest=manifest, image_column=image_column,
                              label_column=label_column, group_column=group_column,
                              split_column=split_column)
    records, classes, labels = fileset.select(records, classes, split_options)
    shape = None if shape_xyz is None else tuple(reversed(shape_xyz))

    def load(path):
        volume, info = read_canonical(path)
        return prepare(volume, shape, window, path), info

    root = Path(src) if src is not None else Path(manifest).parent
    options = {"src": src and str(src), "manifest": manifest and str(manifest),
               "image_column": image_column, "label_column": label_column,
               "group_column": group_column, "classes": classes,
               "shape_xyz": shape_xyz and list(shape_xyz), "window": window and list(window),
               "orientation": "RAS+ canonical, stored as (D, H, W) = (z, y, x)",
               "split_column": split_column, "dtype": dtype}
    return fileset.convert(out, records, classes, labels, load, converter="data_prep.nifti",
                           options=options, root=root, split_options=split_options,
                           name=name or root.name, manifest=manifest,
                           libraries=("nibabel", "scipy"), dtype=dtype)
