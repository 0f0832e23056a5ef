"""NIfTI volumes (.nii, .nii.gz via nibabel) -> (N, 1, D, H, W) in [0, 1].

Axis convention. Every volume is first reoriented to nibabel's closest canonical frame (RAS+:
voxel axes x, y, z increase towards the patient's Right, Anterior and Superior), then stored
transposed as (D, H, W) = (z, y, x): D runs over the axial slices from inferior to superior, H
from posterior to anterior, W from the patient's left to right. The command line's ``--shape X Y
Z`` is given in NIfTI (x, y, z) order, like the shapes that NIfTI tools print; the stored
spatial shape is then (Z, Y, X). ``load_volume`` takes the stored (D, H, W) order, so that
``ddmpi predict`` can pass a data set's spatial shape to it directly.

Intensities: ``window=(lo, hi)`` maps lo..hi linearly to 0..1 and clips (for CT in Hounsfield
units, e.g. -1000..400 for lung); without a window each volume is min-max scaled. The window is
applied before resampling (linear, ``scipy.ndimage.zoom`` with order 1) to the target shape.
Resampling to a fixed voxel shape ignores the physical spacing; the original canonical shape
and spacing of every volume are recorded in the provenance (``sources[i].shape_xyz`` and
``spacing_xyz_mm``).
"""

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_prep import fileset, sources
from data_prep.errors import PrepError
from data_prep.splits import SplitOptions

SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path):
    """Whether the file name ends in .nii or .nii.gz."""
    return Path(path).name.lower().endswith(SUFFIXES)


def convert(out, *, src=None, manifest=None, image_column="image", label_column="label",
            group_column=None, classes=None, shape_xyz=None, window=None,
            split_options=SplitOptions(), name=None):
    """Convert labelled NIfTI volumes to ``out``; return a one-line summary.

    Sources: class sub-folders of ``src`` or a CSV ``manifest`` (paths relative to it; with
    ``group_column`` the splits are grouped, e.g. by patient). ``shape_xyz`` None requires all
    volumes to have one canonical shape.
    """
    if window is not None and not window[0] < window[1]:
        raise PrepError(f"window {window[0]} {window[1]}: the lower bound must be below the upper")
    records = sources.collect(is_nifti, src=src, manifest=manifest, image_column=image_column,
                              label_column=label_column, group_column=group_column)
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
               "orientation": "RAS+ canonical, stored as (D, H, W) = (z, y, x)"}
    return fileset.convert(out, records, classes, labels, load, converter="data_prep.nifti",
                           options=options, root=root, split_options=split_options,
                           name=name or root.name, manifest=manifest,
                           libraries=("nibabel", "scipy"))


def load_volume(path, shape=None, window=None):
    """One NIfTI volume as a (1, D, H, W) float32 array in [0, 1] (see the module docstring).

    ``shape=(D, H, W)`` resamples to that shape (None keeps the canonical one); ``window=(lo, hi)``
    maps intensities lo..hi to 0..1 (None: min-max scaling of this volume).
    """
    volume, _ = read_canonical(path)
    return prepare(volume, shape, window, path)


def read_canonical(path):
    """``(volume (x, y, z) float32 in RAS+ orientation, info)``; info: original orientation,
    canonical shape and voxel spacing in mm."""
    try:
        img = nib.load(path)
        orientation = "".join(nib.aff2axcodes(img.affine))
        canonical = nib.as_closest_canonical(img)
        volume = canonical.get_fdata(dtype=np.float32)
        spacing = [float(z) for z in canonical.header.get_zooms()[:3]]
    except Exception as err:  # nibabel, gzip and numpy raise many types on corrupt files
        raise PrepError(f"{path}: cannot read the NIfTI volume ({type(err).__name__}: {err})") \
            from err
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise PrepError(f"{path}: expected a 3D volume, found shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise PrepError(f"{path}: contains NaN or infinite values")
    return volume, {"orientation": orientation, "shape_xyz": list(volume.shape),
                    "spacing_xyz_mm": spacing}


def prepare(volume, shape, window, path):
    """Window an (x, y, z) volume to [0, 1], transpose to (D, H, W), resample; -> (1, D, H, W)."""
    lo, hi = window if window is not None else (float(volume.min()), float(volume.max()))
    scaled = np.clip((volume - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(volume)
    scaled = scaled.transpose(2, 1, 0)
    if shape is not None and tuple(shape) != scaled.shape:
        factors = [t / s for t, s in zip(shape, scaled.shape)]
        scaled = ndimage.zoom(scaled, factors, order=1)
        if scaled.shape != tuple(shape):
            raise PrepError(f"{path}: resampled to {scaled.shape}, not {tuple(shape)}")
        scaled = np.clip(scaled, 0, 1)
    return scaled[None].astype(np.float32, copy=False)
