"""The ddmpi HDF5 dataset format (version 1): layout, chunking, atomic writer, validating opener.

Layout of one prepared data set (all converters in ``data_prep`` write exactly this)::

    /                    attrs: format="ddmpi-dataset", format_version=1, name, spatial_dims (2|3),
                                channels, spatial_shape, converter, converter_version, created_utc,
                                provenance (JSON: sources with sha256, converter options)
    /classes             (K,) UTF-8 strings, class index -> name
    /normalization       attrs: mean (C,), std (C,): per-channel statistics of the train images
    /<split>/images      (N, C, H, W) or (N, C, D, H, W) float32 in [0, 1], chunked (see below)
    /<split>/labels      (N,) int64 in [0, K)
    /<split>/groups      optional (N,) UTF-8: group id of each sample (e.g. patient), never
                         shared between splits when the converter was given a group column
    /<split>/ids         optional (N,) UTF-8: source of each sample (file name, record index)

``<split>`` is ``train`` (required), ``val`` and ``test``. Images are stored unnormalised in
[0, 1]; readers apply ``(x - mean) / std`` with the statistics above.

Chunking: every spatial axis is cut into tiles of about 1/8 of its length (at least 4 voxels,
or the whole axis when shorter), and a chunk holds the same tile of as many samples as fit in
about 256 KiB. A rank that reads one subdomain of a block of samples therefore touches only the
tiles that intersect its subdomain: little more than the subdomain's own bytes.
"""

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ddmpi import __version__
from ddmpi.data.atomic import atomic_path

FORMAT = "ddmpi-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
CHUNK_TARGET_BYTES = 256 * 1024
TILE_FRACTION = 8
MIN_TILE = 4


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

    @property
    def spatial_dims(self):
        return len(self.spatial_shape)

    @property
    def num_classes(self):
        return len(self.classes)


class DatasetWriter:
    """Write a data set in the ddmpi format, atomically.

    Use as a context manager; splits are written with :meth:`write_split`. The file appears at
    ``path`` only when the ``with`` block ends without an exception; otherwise nothing is left.
    """

    def __init__(self, path, *, name, classes, converter, provenance=None):
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
        """Write one split: ``images`` (N, C, *spatial) in [0, 1], integer ``labels`` (N,)."""
        if split not in SPLITS:
            raise DatasetError(f"{self.path}: unknown split {split!r}; expected one of {SPLITS}")
        images = np.asarray(images, dtype=np.float32)
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
                           chunks=chunk_shape(len(images), images.shape[1], images.shape[2:]))
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
        mean, std = _channel_stats(f["train/images"])
        f.attrs.update({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
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


def _channel_stats(images, block=4096):
    """Per-channel mean and standard deviation of an (N, C, ...) dataset, read in blocks."""
    channels = images.shape[1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for start in range(0, images.shape[0], block):
        x = images[start:start + block].astype(np.float64)
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
    if not path.is_file():
        raise DatasetError(f"{path}: data set file not found")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as err:
        raise DatasetError(f"{path}: not a readable HDF5 file ({err})") from err


def read_info(path):
    """Open ``path``, check it against the schema and return its :class:`DatasetInfo`."""
    path = Path(path)
    with open_h5(path) as f:
        return _validate(path, f)


def _validate(path, f):
    def fail(msg):
        raise DatasetError(f"{path}: {msg}")

    if f.attrs.get("format") != FORMAT:
        fail(f"not a ddmpi data set (attribute 'format' is {f.attrs.get('format')!r}, "
             f"expected {FORMAT!r}); prepare it with 'python -m data_prep'")
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        fail(f"format_version {version} is not supported (this ddmpi reads {FORMAT_VERSION})")
    for key in ("classes", "normalization", "train"):
        if key not in f:
            fail(f"missing '/{key}'")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in f["classes"][()]]
    channels = int(f.attrs["channels"])
    spatial = tuple(int(s) for s in f.attrs["spatial_shape"])
    splits = {}
    has_groups = False
    for split in SPLITS:
        if split not in f:
            continue
        grp = f[split]
        for key in ("images", "labels"):
            if key not in grp:
                fail(f"split '{split}' has no '{key}'")
        n = grp["images"].shape[0]
        if grp["images"].shape[1:] != (channels,) + spatial:
            fail(f"'/{split}/images' has shape {grp['images'].shape}, expected "
                 f"(N, {channels}, {', '.join(map(str, spatial))})")
        if grp["labels"].shape != (n,):
            fail(f"'/{split}/labels' has shape {grp['labels'].shape}, expected ({n},)")
        has_groups |= "groups" in grp
        splits[split] = n
    mean = np.asarray(f["normalization"].attrs["mean"], dtype=np.float32)
    std = np.asarray(f["normalization"].attrs["std"], dtype=np.float32)
    if mean.shape != (channels,) or std.shape != (channels,):
        fail(f"normalization statistics must have {channels} entries")
    return DatasetInfo(path=path, name=str(f.attrs.get("name", path.stem)), classes=classes,
                       channels=channels, spatial_shape=spatial, splits=splits, mean=mean,
                       std=std, has_groups=has_groups,
                       attrs={k: (v.tolist() if hasattr(v, "tolist") else v)
                              for k, v in f.attrs.items()})


def read_labels(path, split):
    """The labels (N,) int64 of one split (no image bytes are read)."""
    with open_h5(path) as f:
        if split not in f:
            raise DatasetError(f"{path}: no split {split!r} in this data set")
        return np.asarray(f[split]["labels"][()], dtype=np.int64)
