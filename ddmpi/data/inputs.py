"""Loading single input files as a prepared data set's samples: images, NIfTI volumes, CIFAR
python batches (for ``ddmpi predict``; the ``data_prep`` converters use the same loaders).

Conventions (axes, windows, scaling) are in docs/dataset-format.md. Pillow, nibabel and scipy
are imported on first use.
"""

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ddmpi.data.schema import DatasetError

log = logging.getLogger(__name__)

__all__ = ["ALLOWED_GLOBALS", "InputError", "is_cifar_batch", "is_image", "is_nifti",
           "load_image", "load_inputs", "load_pickle", "load_sample", "load_volume", "probe",
           "read_canonical", "read_cifar_batch", "resize"]

MODES = ("grey", "rgb")
CHANNELS = {"grey": 1, "rgb": 3}
_MODE = {c: m for m, c in CHANNELS.items()}
HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # 16-bit integer images: / 65535
EXIF_ORIENTATION = 0x0112  # values 5..8 mean the stored image is transposed
UNDECODED_FORMATS = {"EPS", "MPEG"}  # Pillow reads their headers only (EPS needs Ghostscript)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
CIFAR_SIDE = 32
ALLOWED_GLOBALS = {  # what numpy arrays in pickles written by numpy 1.x/2.x and Python 2/3 need
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "bytes"), ("__builtin__", "bytes"),  # the buffer of an empty array
}
PICKLED_DICT_STARTS = {0x80, ord("("), ord("}")}  # protocol 2+, 0 (MARK DICT), 1 (EMPTY_DICT)


class InputError(DatasetError):
    """An input file or option is missing, corrupt, truncated or mislabelled; the message
    starts with the offending file (or option)."""


# -- images -----------------------------------------------------------------------------------

def is_image(path):
    """Whether Pillow can decode files with this extension: its stub formats (HDF5, GRIB,
    BUFR, WMF), vector PostScript and MPEG are identified by Pillow but not decoded."""
    from PIL import Image, ImageFile

    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.OPEN or fmt in UNDECODED_FORMATS:
        return False
    factory = Image.OPEN[fmt][0]
    return not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))


def load_image(path, size=None, mode="grey"):
    """One image file as (C, H, W) float32 in [0, 1]; C is 1 (``grey``) or 3 (``rgb``).

    ``size=(H, W)`` resizes (bilinear, antialiased); None keeps the file's size.
    """
    from PIL import Image, ImageOps

    if mode not in MODES:
        raise InputError(f"image mode {mode!r}: expected one of {MODES}")
    try:
        with Image.open(path) as img:
            return _to_array(ImageOps.exif_transpose(img), size, mode)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... on bad files
        raise InputError(f"{path}: cannot decode the image ({type(err).__name__}: {err})") \
            from err


def resize(plane, size):
    """Resize a 2D float array to ``size=(H, W)`` (bilinear, antialiased); None keeps it."""
    from PIL import Image

    plane = np.asarray(plane, dtype=np.float32)
    if size is None or tuple(size) == plane.shape:
        return plane
    img = Image.fromarray(plane).resize((size[1], size[0]), Image.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def _to_array(img, size, mode):
    from PIL import Image

    if img.mode in HIGH_BIT_MODES or img.mode == "F":
        scale = 1.0 if img.mode == "F" else 65535.0
        plane = resize(np.clip(np.asarray(img, dtype=np.float32) / scale, 0.0, 1.0), size)
        return np.repeat(plane[None], CHANNELS[mode], axis=0)
    img = img.convert("L" if mode == "grey" else "RGB")
    if size is not None and (size[1], size[0]) != img.size:
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return array[None] if mode == "grey" else array.transpose(2, 0, 1)


def probe(path):
    """``(mode, (H, W))`` from the file header alone: ``rgb`` for colour images (palettes
    with a colour entry included)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            colour = len(img.getbands()) >= 3 or (img.mode in ("P", "PA")
                                                   and _palette_has_colour(img))
            width, height = img.size
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
    except Exception as err:
        raise InputError(f"{path}: cannot decode the image ({type(err).__name__}: {err})") \
            from err
    return ("rgb" if colour else "grey"), (height, width)


def _palette_has_colour(img):
    palette = img.getpalette("RGB") or []
    return any(len(set(palette[i:i + 3])) > 1 for i in range(0, len(palette), 3))


# -- NIfTI volumes ----------------------------------------------------------------------------

def is_nifti(path):
    """Whether the file name ends in .nii or .nii.gz."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def load_volume(path, shape=None, window=None):
    """One NIfTI volume as (1, D, H, W) float32 in [0, 1], RAS+ canonical, (D, H, W) = (z, y, x).

    ``shape=(D, H, W)`` resamples; ``window=(lo, hi)`` maps lo..hi to 0..1 (None: min-max).
    """
    volume, _ = read_canonical(path)
    return prepare(volume, shape, window, path)


def read_canonical(path):
    """``(volume (x, y, z) float32 in RAS+ orientation, info)``; info: original orientation,
    canonical shape and voxel spacing in mm."""
    import nibabel as nib

    try:
        img = nib.load(path)
        orientation = "".join(nib.aff2axcodes(img.affine))
        canonical = nib.as_closest_canonical(img)
        volume = canonical.get_fdata(dtype=np.float32)
        spacing = [float(z) for z in canonical.header.get_zooms()[:3]]
    except Exception as err:  # nibabel, gzip and numpy raise many types on corrupt files
        raise InputError(f"{path}: cannot read the NIfTI volume ({type(err).__name__}: {err})") \
            from err
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, found shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise InputError(f"{path}: contains NaN or infinite values")
    return volume, {"orientation": orientation, "shape_xyz": list(volume.shape),
                    "spacing_xyz_mm": spacing}


def prepare(volume, shape, window, path):
    """Window an (x, y, z) volume to [0, 1], transpose to (D, H, W), resample; -> (1, D, H, W)."""
    from scipy import ndimage

    lo, hi = window if window is not None else (float(volume.min()), float(volume.max()))
    scaled = np.clip((volume - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(volume)
    scaled = scaled.transpose(2, 1, 0)
    if shape is not None and tuple(shape) != scaled.shape:
        factors = [t / s for t, s in zip(shape, scaled.shape)]
        scaled = ndimage.zoom(scaled, factors, order=1)
        if scaled.shape != tuple(shape):
            raise InputError(f"{path}: resampled to {scaled.shape}, not {tuple(shape)}")
        scaled = np.clip(scaled, 0, 1)
    return scaled[None].astype(np.float32, copy=False)


# -- CIFAR python batches ---------------------------------------------------------------------

class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays "
                                         f"and plain containers are allowed)")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 renamed numpy.core
        return super().find_class(module, name)


def load_pickle(path):
    """A pickled dict with str keys, unpickled with the numpy-only allow-list."""
    try:
        with open(path, "rb") as f:
            obj = _AllowListUnpickler(f, encoding="latin1").load()
    except Exception as err:  # unpickling raises many types on corrupt input
        raise InputError(f"{path}: not a readable python pickle ({type(err).__name__}: {err})") \
            from err
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def is_cifar_batch(path):
    """Whether ``path`` is neither an image nor a volume and starts like a pickled dict."""
    path = Path(path)
    if is_image(path) or is_nifti(path) or path.suffix.lower() in H5_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            start = f.read(1)
    except OSError:
        return False
    return len(start) == 1 and start[0] in PICKLED_DICT_STARTS


def read_cifar_batch(path, label_key="labels", num_classes=10, labels_required=True,
                     id_prefix=None):
    """``(images (N, 3, 32, 32) uint8, labels (N,) int64 or None, ids)`` of one CIFAR batch;
    ids: the batch's ``filenames``, else ``{id_prefix}:{i}`` (default prefix: the file name)."""
    path = Path(path)
    batch = load_pickle(path)
    wanted = ("data", label_key) if labels_required else ("data",)
    missing = [k for k in wanted if k not in batch]
    if missing:
        raise InputError(f"{path}: not a CIFAR batch with {label_key!r} labels: missing key(s) "
                         f"{missing}; found {sorted(batch)}")
    data = batch["data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * CIFAR_SIDE * CIFAR_SIDE):
        raise InputError(f"{path}: 'data' must be an N x {3 * CIFAR_SIDE * CIFAR_SIDE} uint8 "
                         f"array, found {type(data).__name__} {getattr(data, 'dtype', '')} "
                         f"{getattr(data, 'shape', '')}")
    if len(data) == 0:
        raise InputError(f"{path}: the CIFAR batch holds no images")
    labels = _cifar_labels(path, batch, label_key, num_classes, len(data))
    names = batch.get("filenames")
    if names is None or len(names) != len(data):
        names = [f"{id_prefix or path.name}:{i}" for i in range(len(data))]
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    return data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE), labels, names


def _cifar_labels(path, batch, label_key, num_classes, n):
    if label_key not in batch:
        return None
    labels = np.asarray(batch[label_key])
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{path}: {label_key!r} must hold {n} integer labels, found "
                         f"{labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{path}: labels outside 0..{num_classes - 1}")
    return labels.astype(np.int64)


# -- samples of a data set --------------------------------------------------------------------

def _describe(info):
    """``(channels, spatial_shape, window)`` of a DatasetInfo or a run's dataset.json dict."""
    if isinstance(info, Mapping):
        options = info.get("preprocessing", {}) or {}
        return int(info["channels"]), tuple(info["spatial_shape"]), options.get("window")
    provenance = json.loads(info.attrs.get("provenance", "{}") or "{}")
    return info.channels, tuple(info.spatial_shape), provenance.get("options", {}).get("window")


def load_sample(path, info):
    """One image or NIfTI file as one sample of the data set ``info`` (a
    :class:`~ddmpi.data.schema.DatasetInfo` or a run's dataset.json dict): (C, *shape) float32."""
    channels, shape, window = _describe(info)
    kind = "a NIfTI volume (3D)" if is_nifti(path) else "an image (2D)"
    if len(shape) != (3 if is_nifti(path) else 2):
        raise InputError(f"{path}: {kind}, but the data set's samples are "
                         f"{channels}x{'x'.join(map(str, shape))} ({len(shape)}D)")
    if is_nifti(path):
        return load_volume(path, shape, window)
    return load_image(path, shape, "grey" if channels == 1 else "rgb")


def load_inputs(paths, info, split="test"):
    """Input files as samples of the data set ``info``: ``(x (N, C, *shape) float32 in [0, 1],
    ids, labels (N,) int64 or None)``. One HDF5 data set gives its ``split``; a CIFAR python
    batch all its images; image and NIfTI files one sample each (then labels are None)."""
    channels, shape, _ = _describe(info)
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].suffix.lower() in H5_SUFFIXES:
        x, ids, labels = _load_h5_split(paths[0], split, _classes(info))
    else:
        x, ids, labels = _load_files(paths, info, channels, shape)
    if x.shape[1:] != (channels,) + shape:
        raise InputError(f"{paths[0]}: loaded as {x.shape[1:]}, expected {(channels,) + shape}")
    return x, ids, labels


def _classes(info):
    return list(info["classes"] if isinstance(info, Mapping) else info.classes)


def _load_h5_split(path, split, classes):
    """``split`` of a prepared data set, unnormalised in [0, 1], with its ids and labels;
    its classes must be ``classes`` (labels are indices into them). Labels and images are
    checked as training checks them."""
    from ddmpi.data.schema import check_finite, open_h5, read_info, reading, split_labels

    info = read_info(path)
    if list(info.classes) != classes:
        raise InputError(f"{path}: classes {list(info.classes)} differ from the run's "
                         f"{classes}")
    norm = info.normalization
    with open_h5(path) as f:
        if split not in f:
            raise InputError(f"{path}: no split {split!r}")
        labels = split_labels(f, split, path)
        with reading(path, f"/{split}/ids"):
            ids = (list(f[split]["ids"].asstr()[()]) if "ids" in f[split]
                   else [f"{split}:{i}" for i in range(len(labels))])
        with reading(path, f"/{split}/images"):
            images = check_finite(f[split]["images"][()], path, split)
        return norm.unit(images), ids, labels


def _load_files(paths, info, channels, shape):
    arrays, ids, labels, converted = [], [], [], []
    for path in paths:
        if path.is_dir():
            raise InputError(f"{path}: a directory, not an input file (give the files in it)")
        if not path.is_file():
            raise InputError(f"{path}: input file not found")
        if is_nifti(path) or is_image(path):
            arrays.append(load_sample(path, info)[None])
            found = probe(path) if is_image(path) else None
            if found not in (None, (_MODE[channels], shape)):
                converted.append((path, found))
            ids.append(str(path))
            labels.append(None)
        elif path.suffix.lower() in H5_SUFFIXES:
            raise InputError(f"{path}: an HDF5 data set must be the only input")
        elif is_cifar_batch(path):
            if (channels, shape) != (3, (CIFAR_SIDE, CIFAR_SIDE)):
                raise InputError(f"{path}: CIFAR images are 3x32x32, the data set's are "
                                 f"{channels}x{'x'.join(map(str, shape))}")
            data, y, names = read_cifar_batch(path, labels_required=False, id_prefix=path)
            arrays.append(data.astype(np.float32) / 255)
            ids += names
            labels.append(y)
        else:
            raise InputError(f"{path}: unsupported input type (expected a ddmpi HDF5 file, an "
                             f"image file, a NIfTI volume or a CIFAR python batch)")
    if not arrays:
        raise InputError("no input files given")
    if converted:
        path, (mode, size) = converted[0]
        log.warning("%d input image(s) resized or converted to the data set's %dx%s (%s: %s "
                    "%dx%d)", len(converted), channels, "x".join(map(str, shape)), path, mode,
                    *size)
    known = None if any(y is None for y in labels) else np.concatenate(labels)
    return np.concatenate(arrays).astype(np.float32, copy=False), ids, known
