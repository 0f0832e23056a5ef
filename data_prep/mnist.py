"""MNIST and Fashion-MNIST from their IDX files (``--src DIR``, optionally ``--download``)."""

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data_prep import download, provenance
from data_prep.errors import PrepError
from data_prep.idx import read_idx
from data_prep.output import write_dataset
from data_prep.splits import SplitOptions, split_sources

log = logging.getLogger(__name__)

FILES = {  # official split -> (images, labels) file stems; each may end in .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
VARIANTS = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "http://yann.lecun.com/exdb/mnist/"],
        "md5": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        "classes": [str(d) for d in range(10)],
    },
    "fashion": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/"
                    "data/fashion/"],
        "md5": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot"],
    },
}


def convert(out, *, src, variant="mnist", download_missing=False, fresh_split=False,
            split_options=SplitOptions(), name=None, dtype="float32"):
    """Convert the IDX files in ``src`` to ``out``; return a one-line summary.

    With both official splits present, the official test split is kept as ``test`` and ``val`` is
    carved (stratified) from the training split, unless ``fresh_split`` pools both and splits
    anew. With only one of them present (e.g. the 10k test files alone), that one is split.
    """
    src = Path(src)
    spec = VARIANTS[variant]
    if download_missing:
        for filename, md5 in spec["md5"].items():
            if _find(src, filename[:-3]) is None:
                download.fetch(filename, spec["mirrors"], md5, src)
    found = {s: read_split(src, *stems) for s, stems in FILES.items()}
    found = {s: v for s, v in found.items() if v is not None}
    if not found:
        raise PrepError(f"{src}: no MNIST IDX files here (expected {FILES['train'][0]}[.gz], "
                        f"{FILES['test'][0]}[.gz] and their label files); add --download to "
                        f"fetch them")
    if len(found) == 1 and not fresh_split:
        log.info("only the %s files are in %s: splitting them into train/val/test",
                 next(iter(found)), src)
    keep, parts = split_sources({s: y for s, (_, y, _) in found.items()}, split_options,
                                fresh_split)
    images = np.concatenate([found[s][0][k] for s, k in keep.items()])
    labels = np.concatenate([found[s][1][k] for s, k in keep.items()])
    ids = [f"{found[s][2]}:{i}" for s, k in keep.items() for i in k]

    sources = [provenance.file_record(p, src) for stems in FILES.values() for stem in stems
               if (p := _find(src, stem)) is not None]
    options = {"src": str(src), "variant": variant, "download": download_missing,
               "fresh_split": fresh_split, **asdict(split_options),
               "official_test_kept": len(found) == 2 and not fresh_split, "dtype": dtype}
    prov = provenance.build("data_prep.mnist", options, sources, root=src)
    return write_dataset(out, name=name or variant, classes=spec["classes"],
                         converter="data_prep.mnist", provenance=prov, images=images,
                         labels=labels, parts=parts, ids=ids, dtype=dtype)


def read_split(src, images_stem, labels_stem):
    """``(images (N, 1, H, W) uint8, labels (N,) int64, stem)`` of one official split, or None."""
    images_path, labels_path = _find(src, images_stem), _find(src, labels_stem)
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        missing = images_stem if images_path is None else labels_stem
        raise PrepError(f"{src / missing}[.gz]: missing (the other file of the pair is present)")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise PrepError(f"{images_path}: expected N x H x W unsigned bytes, found "
                        f"{images.dtype.name} with shape {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise PrepError(f"{labels_path}: expected N unsigned-byte labels, found "
                        f"{labels.dtype.name} with shape {labels.shape}")
    if len(labels) != len(images):
        raise PrepError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of "
                        f"{images_path}")
    if labels.size and labels.max() > 9:
        raise PrepError(f"{labels_path}: label {labels.max()} outside 0..9")
    return images[:, None], labels.astype(np.int64), images_stem


def _find(src, stem):
    """``src/stem.gz`` or ``src/stem``, whichever exists (the .gz first), else None."""
    for path in (src / f"{stem}.gz", src / stem):
        if path.is_file():
            return path
    return None
