"""The ddmpi HDF5 data set format (versions 1 and 2): layout, chunking, atomic writer, opener.

Layout, storage dtypes and chunking are documented in docs/dataset-format.md.
"""

import datetime
import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ddmpi import __version__
from ddmpi.data.atomic import atomic_path

FORMAT = "ddmpi-dataset"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # v1: float32 only; v2 adds uint8 storage (attrs storage_dtype, scale)
STORAGE_DTYPES = ("float32", "uint8")
UINT8_SCALE = 1 / 255  # a stored uint8 value v stands for v * scale = v / 255 in [0, 1]
SPLITS = ("train", "val", "test")
CHUNK_TARGET_BYTES = 256 * 1024
TILE_FRACTION = 8
MIN_TILE = 4
H5_ERRORS = (OSError, KeyError, RuntimeError)  # what h5py raises on a corrupt or truncated file
FINGERPRINT_ROWS = 16  # images per split in the fingerprint, evenly spaced
FINGERPRINT_VERSION = 2  # 2: hashes the images' float32 values in [0, 1]; 1: their stored bytes


class DatasetError(ValueError):
    """A prepared data set (or its input) is missing, corrupt or does not follow the schema."""


def chunk_shape(n_samples, channels, spatial_shape, itemsize=4):
    """Chunk shape (samples, C, *tiles) for subdomain reads of a (N, C, *spatial) array."""
    tiles = tuple(min(s, max(MIN_TILE, math.ceil(s / TILE_FRACTION))) for s in spatial_shape)
    tile_bytes = channels * math.prod(tiles) * itemsize
    samples = max(1, min(n_samples, CHUNK_TARGET_BYTES // tile_bytes))
    rows = math.ceil(n_samples / samples)
    samples = math.ceil(n_samples / rows)  # equal chunk rows: no mostly-empty last row to read
    return (samples, channels) + tiles


@dataclass
class DatasetInfo:
    """What a reader needs to know about a prepared data set, validated against the schema."""

    path: Path
    name: str
    classes: list
    channels: int
    spatial_shape: tuple
    splits: dict  # split name -> number of samples
    mean: np.ndarray
    std: np.ndarray
    has_groups: bool = False
    attrs: dict = field(default_factory=dict)
    storage_dtype: str = "float32"  # dtype of the stored images: "float32" or "uint8"
    scale: float = 1.0  # stored value * scale = image value in [0, 1]
    version: int = FORMAT_VERSION

    @property
    def spatial_dims(self):
        return len(self.spatial_shape)

    @property
    def itemsize(self):
        """Bytes per stored image value."""
        return np.dtype(self.storage_dtype).itemsize

    @property
    def normalization(self):
        """The :class:`Normalization` that turns stored images into network inputs."""
        return Normalization(self.mean, self.std, self.scale)

    @property
    def num_classes(self):
        return len(self.classes)


class Normalization:
    """Stored images -> float32 network inputs: ``(x * scale - mean[c]) / std[c]`` per channel.

    A uint8 ``x`` is divided by ``1 / scale`` (255): bit-identical to the float32 file.
    """

    def __init__(self, mean, std, scale=1.0):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1)
        self.scale = float(scale)
        self.divisor = None if self.scale == 1.0 else float(round(1 / self.scale))
        self._torch = {}

    def __repr__(self):
        return (f"Normalization(mean={self.mean.tolist()}, std={self.std.tolist()}, "
                f"scale={self.scale:.6g})")

    def _shaped(self, ndim):
        shape = (-1,) + (1,) * ndim
        return self.mean.reshape(shape), self.std.reshape(shape)

    def unit(self, x):
        """Stored numpy images as float32 in [0, 1] (a new array unless already float32)."""
        if self.divisor is None:
            return np.asarray(x, dtype=np.float32)
        out = np.asarray(x).astype(np.float32)
        out /= np.float32(self.divisor)
        return out

    def apply(self, x, block=4096):
        """Stored numpy images ``(N, C, *spatial)`` normalised as float32 (in place if float32)."""
        x = self.unit(x)
        mean, std = self._shaped(x.ndim - 2)
        for start in range(0, len(x), max(1, int(block))):
            xb = x[start:start + block]
            xb -= mean
            xb /= std
        return x

    def apply_torch(self, x, out=None):
        """Stored torch images ``(B, C, *spatial)`` normalised as float32 on their device."""
        key = (x.device, x.ndim)
        if key not in self._torch:
            import torch

            mean, std = self._shaped(x.ndim - 2)
            self._torch[key] = (torch.from_numpy(mean).to(x.device),
                                torch.from_numpy(std).to(x.device))
        mean, std = self._torch[key]
        if out is None:
            out = x.float() if x.dtype != mean.dtype else x.clone()
        elif out.data_ptr() != x.data_ptr():
            out.copy_(x)
        if self.divisor is not None:
            out.div_(self.divisor)
        return out.sub_(mean).div_(std)


def to_stored(images, storage_dtype):
    """``images`` (uint8, or float in [0, 1]) in ``storage_dtype``: uint8 holds round(x * 255)."""
    images = np.asarray(images)
    if storage_dtype == "uint8":
        if images.dtype == np.uint8:
            return images
        return np.rint(np.asarray(images, dtype=np.float64) * 255).clip(0, 255).astype(np.uint8)
    if images.dtype == np.uint8:
        out = images.astype(np.float32)
        out /= 255
        return out
    return np.asarray(images, dtype=np.float32)


class DatasetWriter:
    """Write a data set in the ddmpi format (version 2), atomically.

    Use as a context manager; splits are written with :meth:`write_split`. The file appears at
    ``path`` only when the ``with`` block ends without an exception; otherwise nothing is left.
    ``dtype`` is the image storage: ``"float32"`` or ``"uint8"`` (round(x * 255)).
    """

    def __init__(self, path, *, name, classes, converter, provenance=None, dtype="float32"):
        if dtype not in STORAGE_DTYPES:
            raise DatasetError(f"{path}: storage dtype {dtype!r} is not one of {STORAGE_DTYPES}")
        self.dtype = dtype
        self.scale = UINT8_SCALE if dtype == "uint8" else 1.0
        self.path = Path(path)
        self.name = name
        self.classes = [str(c) for c in classes]
        self.converter = converter
        self.provenance = provenance or {}
        self._ctx = None
        self._file = None
        self._shape = None

    def __enter__(self):
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._file = h5py.File(tmp, "w")
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._finish()
            self._file.close()
        except BaseException as err:  # a failure while finishing must still remove the temp file
            self._file.close()
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        return self._ctx.__exit__(exc_type, exc, tb)

    def write_split(self, split, images, labels, groups=None, ids=None):
        """Write one split: ``images`` (N, C, *spatial) uint8 or in [0, 1], ``labels`` (N,)."""
        if split not in SPLITS:
            raise DatasetError(f"{self.path}: unknown split {split!r}; expected one of {SPLITS}")
        images = to_stored(images, self.dtype)
        labels = np.asarray(labels, dtype=np.int64)
        if images.ndim not in (4, 5):
            raise DatasetError(
                f"{self.path}: split {split!r}: images must be (N, C, H, W) or (N, C, D, H, W), "
                f"got shape {images.shape}")
        if self._shape is None:
            self._shape = images.shape[1:]
        elif images.shape[1:] != self._shape:
            raise DatasetError(f"{self.path}: split {split!r}: sample shape {images.shape[1:]} "
                               f"differs from earlier splits' {self._shape}")
        if labels.shape != (len(images),):
            raise DatasetError(f"{self.path}: split {split!r}: {len(labels)} labels for "
                               f"{len(images)} images")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DatasetError(f"{self.path}: split {split!r}: labels outside "
                               f"[0, {len(self.classes)})")
        if len(images) == 0:
            raise DatasetError(f"{self.path}: split {split!r} is empty")
        grp = self._file.create_group(split)
        grp.create_dataset("images", data=images,
                           chunks=chunk_shape(len(images), images.shape[1], images.shape[2:],
                                              images.dtype.itemsize))
        grp.create_dataset("labels", data=labels)
        for key, values in (("groups", groups), ("ids", ids)):
            if values is not None:
                if len(values) != len(images):
                    raise DatasetError(f"{self.path}: split {split!r}: {len(values)} {key} for "
                                       f"{len(images)} images")
                grp.create_dataset(key, data=np.asarray([str(v) for v in values], dtype=object),
                                   dtype=h5py.string_dtype())

    def _finish(self):
        f = self._file
        if "train" not in f:
            raise DatasetError(f"{self.path}: no train split was written")
        mean, std = _channel_stats(f["train/images"], Normalization([0], [1], self.scale))
        f.attrs.update({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "storage_dtype": self.dtype,
            "scale": self.scale,
            "name": self.name,
            "channels": self._shape[0],
            "spatial_dims": len(self._shape) - 1,
            "spatial_shape": np.asarray(self._shape[1:], dtype=np.int64),
            "converter": self.converter,
            "converter_version": __version__,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "provenance": json.dumps(self.provenance, sort_keys=True, default=str),
        })
        f.create_dataset("classes", data=np.asarray(self.classes, dtype=object),
                         dtype=h5py.string_dtype())
        norm = f.create_group("normalization")
        norm.attrs["mean"] = mean
        norm.attrs["std"] = std


def _channel_stats(images, norm, block=4096):
    """Per-channel mean and standard deviation of an (N, C, ...) dataset's [0, 1] values."""
    channels = images.shape[1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for start in range(0, images.shape[0], block):
        x = norm.unit(images[start:start + block]).astype(np.float64)
        axes = (0,) + tuple(range(2, x.ndim))
        total += x.sum(axis=axes)
        total_sq += (x * x).sum(axis=axes)
        count += x.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def open_h5(path):
    """Open a prepared data set read-only without HDF5 file locking (many ranks, one file)."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path}: a directory, not an HDF5 data set file")
    if not path.is_file():
        raise DatasetError(f"{path}: data set file not found")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as err:
        raise DatasetError(f"{path}: not a readable HDF5 file ({err})") from err


@contextmanager
def reading(path, name):
    """Within: h5py's errors (a corrupt or truncated file) become a :class:`DatasetError`
    "``path``: cannot read ``name`` (h5py's message)"."""
    try:
        yield
    except H5_ERRORS as err:
        message = getattr(err, "strerror", None) or (err.args[0] if err.args else repr(err))
        raise DatasetError(f"{path}: cannot read {name} ({message})") from err


def h5_object(f, path, name):
    """The object ``name`` (a path in the file) of the open data set file ``f``."""
    with reading(path, name):
        return f[name]


def read_info(path):
    """Open ``path``, check it against the schema and return its :class:`DatasetInfo`."""
    path = Path(path)
    with open_h5(path) as f, reading(path, "its header"):
        return _validate(path, f)


def _validate(path, f):
    path = Path(path)

    def fail(msg):
        raise DatasetError(f"{path}: {msg}")

    if f.attrs.get("format") != FORMAT:
        fail(f"not a ddmpi data set (attribute 'format' is {f.attrs.get('format')!r}, "
             f"expected {FORMAT!r}); prepare it with 'python -m data_prep'")
    version = _attr(f, "format_version", int, fail)
    if version not in READ_VERSIONS:
        fail(f"format_version {version} is not supported (this ddmpi reads versions "
             f"{', '.join(map(str, READ_VERSIONS))})")
    for key in ("classes", "normalization", "train"):
        if key not in f:
            fail(f"missing '/{key}'")
    storage, scale = _storage(f, version, fail)
    with reading(path, "/classes"):
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in f["classes"][()]]
    channels = _attr(f, "channels", int, fail)
    spatial = _attr(f, "spatial_shape", lambda v: tuple(int(s) for s in v), fail)
    sample_shape = (channels,) + spatial
    splits = {s: _check_split_group(f, path, s, sample_shape, storage, fail)
              for s in SPLITS if s in f}
    norm = h5_object(f, path, "/normalization")
    mean = _attr(norm, "mean", lambda v: np.asarray(v, dtype=np.float32), fail, "/normalization")
    std = _attr(norm, "std", lambda v: np.asarray(v, dtype=np.float32), fail, "/normalization")
    if mean.shape != (channels,) or std.shape != (channels,):
        fail(f"normalization statistics must have {channels} entries")
    if not (np.all(np.isfinite(mean)) and np.all(std > 0)):
        fail("'/normalization' attributes mean/std must be finite with std > 0")
    return DatasetInfo(path=path, name=str(f.attrs.get("name", path.stem)), classes=classes,
                       channels=channels, spatial_shape=spatial, splits=splits, mean=mean,
                       std=std, has_groups=any("groups" in f[s] for s in splits),
                       storage_dtype=storage, scale=scale, version=version,
                       attrs={k: (v.tolist() if hasattr(v, "tolist") else v)
                              for k, v in f.attrs.items()})


def _attr(obj, name, convert, fail, where="/"):
    """Attribute ``name`` of ``obj`` converted, or a failure naming it."""
    try:
        return convert(obj.attrs[name])
    except (KeyError, TypeError, ValueError) as err:
        fail(f"attribute {name!r} of '{where}' is missing or invalid ({err})")


def _check_split_group(f, path, split, sample_shape, storage, fail):
    """Number of samples of one split group, after checking its datasets."""
    grp = h5_object(f, path, f"/{split}")
    for key in ("images", "labels"):
        if key not in grp:
            fail(f"split '{split}' has no '{key}'")
    images, labels = (h5_object(grp, path, f"/{split}/{key}") for key in ("images", "labels"))
    n = images.shape[0] if images.ndim else 0
    if images.shape[1:] != sample_shape:
        fail(f"'/{split}/images' has shape {images.shape}, expected "
             f"(N, {', '.join(map(str, sample_shape))})")
    if images.dtype != np.dtype(storage):
        fail(f"'/{split}/images' has dtype {images.dtype}, but the file's storage_dtype "
             f"is {storage!r}")
    if labels.shape != (n,):
        fail(f"'/{split}/labels' has shape {labels.shape}, expected ({n},)")
    if not np.issubdtype(labels.dtype, np.integer):
        fail(f"'/{split}/labels' has dtype {labels.dtype}, expected integers")
    return n


def normalization_of(f, path=None):
    """The :class:`Normalization` of an open data set file, from its attributes alone."""
    path = Path(path or getattr(f, "filename", "<h5 file>"))

    def fail(msg):
        raise DatasetError(f"{path}: {msg}")

    _, scale = _storage(f, _attr(f, "format_version", int, fail), fail)
    with reading(path, "/normalization"):
        norm = f["normalization"].attrs
        return Normalization(norm["mean"], norm["std"], scale)


def _storage(f, version, fail):
    """``(storage_dtype, scale)`` from the root attributes (v1: float32, scale 1)."""
    if version == 1:
        return "float32", 1.0
    storage = f.attrs.get("storage_dtype")
    storage = storage.decode() if isinstance(storage, bytes) else storage
    if storage not in STORAGE_DTYPES:
        fail(f"attribute 'storage_dtype' is {storage!r}, expected one of {STORAGE_DTYPES}")
    expected = UINT8_SCALE if storage == "uint8" else 1.0
    try:
        scale = float(f.attrs.get("scale"))
    except (TypeError, ValueError):
        scale = None
    if scale is None or not math.isclose(scale, expected, rel_tol=1e-9):
        shown = f.attrs.get("scale")
        shown = shown.item() if hasattr(shown, "item") else shown
        fail(f"attribute 'scale' is {shown!r}, expected {expected!r} for "
             f"{storage} storage")
    return storage, expected


def read_labels(path, split):
    """The labels (N,) int64 of one split, checked (no image bytes are read)."""
    with open_h5(path) as f:
        if split not in f:
            raise DatasetError(f"{path}: no split {split!r} in this data set")
        return split_labels(f, split, path)


def split_labels(f, split, path):
    """The labels (N,) int64 of ``split`` of the open data set file ``f``; each must index
    the file's classes."""
    with reading(path, f"/{split}/labels"):
        labels = np.asarray(f[split]["labels"][()], dtype=np.int64)
    with reading(path, "/classes"):
        k = len(f["classes"])
    outside = labels[(labels < 0) | (labels >= k)]
    if len(outside):
        raise DatasetError(f"{path}: {split}/labels holds {outside[0]}, not a class index "
                           f"0..{k - 1}")
    return labels


def check_finite(x, path, split):
    """``x``, refused if it holds NaN or infinite values (a float image would poison training)."""
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DatasetError(f"{path}: {split}/images holds NaN or infinite values")
    return x


def dataset_fingerprint(path, stored=False):
    """sha256 of every split's labels, sample ids and FINGERPRINT_ROWS of its images: another
    split, selection of samples or preprocessing of the images has another (reading a few
    rows, not the data set). The images count as the float32 values in [0, 1] the network
    starts from, alike for uint8 and float32 storage of the same images; ``stored``: as their
    stored bytes (version 1)."""
    digest = hashlib.sha256()
    with open_h5(path) as f:
        norm = normalization_of(f, path)
        for split in (s for s in SPLITS if s in f):
            labels = split_labels(f, split, path)
            digest.update(labels.astype("<i8").tobytes())
            with reading(path, f"/{split}/ids"):
                if "ids" in f[split]:
                    digest.update(b"\0".join(f[split]["ids"][()].astype(bytes)))
            n = len(labels)
            rows = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_ROWS)).astype(int))
            with reading(path, f"/{split}/images"):
                images = f[split]["images"][rows]
            digest.update(np.ascontiguousarray(images if stored else norm.unit(images)).tobytes())
    return digest.hexdigest()
