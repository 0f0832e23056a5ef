"""CIFAR-10 / CIFAR-100 from the python pickle batches (``--src DIR``, optionally ``--download``).

The batches are unpickled with the allow-list of :mod:`ddmpi.data.inputs` (numpy arrays and
plain containers only), so a tampered file cannot run code. Without ``test_batch`` (e.g. the
training batches alone), the test split is drawn from the training batches.
"""

import logging
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data_prep import download, provenance
from data_prep.errors import PrepError
from data_prep.output import write_dataset
from data_prep.splits import DEFAULT_TEST_FRACTION, SplitOptions, split_sources
from ddmpi.data.atomic import atomic_path
from ddmpi.data.inputs import ALLOWED_GLOBALS, load_pickle, read_cifar_batch  # noqa: F401

log = logging.getLogger(__name__)

MIRRORS = ["https://www.cs.toronto.edu/~kriz/"]
VARIANTS = {
    "cifar10": {"archive": "cifar-10-python.tar.gz", "md5": "c58f30108f718f92721af3b95e74349a",
                "folder": "cifar-10-batches-py", "meta": "batches.meta",
                "splits": {"train": [f"data_batch_{i}" for i in range(1, 6)],
                           "test": ["test_batch"]}},
    "cifar100": {"archive": "cifar-100-python.tar.gz", "md5": "eb9058c3a382ffc7106e4002c42a8d85",
                 "folder": "cifar-100-python", "meta": "meta",
                 "splits": {"train": ["train"], "test": ["test"]}},
}
LABELS = {  # (variant, label type) -> (labels key, class names key in the meta file, classes)
    ("cifar10", "fine"): ("labels", "label_names", 10),
    ("cifar100", "fine"): ("fine_labels", "fine_label_names", 100),
    ("cifar100", "coarse"): ("coarse_labels", "coarse_label_names", 20),
}


def convert(out, *, src, variant=None, label_type="fine", download_missing=False,
            fresh_split=False, split_options=SplitOptions(), name=None, dtype="float32"):
    """Convert CIFAR batches in ``src`` (or its ``cifar-10-batches-py``/``cifar-100-python``).

    The official test batch, when present, is kept as ``test`` (unless ``fresh_split``);
    without it, ``test`` is drawn from the training batches (seeded, stratified).
    """
    src = Path(src)
    if download_missing:
        fetch(variant or "cifar10", src)
    variant, folder = locate(src, variant)
    spec = VARIANTS[variant]
    if (variant, label_type) not in LABELS:
        raise PrepError(f"{folder}: {variant} has no {label_type!r} labels")
    label_key, names_key, num_classes = LABELS[variant, label_type]
    classes = _class_names(folder / spec["meta"], names_key, num_classes)
    missing = [f for f in spec["splits"]["train"] if not (folder / f).is_file()]
    if missing:
        raise PrepError(f"{folder / missing[0]}: missing (incomplete {variant} batches)")
    present = {split: files for split, files in spec["splits"].items()
               if all((folder / f).is_file() for f in files)}
    if "test" not in present:
        log.info("%s: no %s: the test split is drawn from the training batches", folder,
                 ", ".join(spec["splits"]["test"]))
    pools = {}  # official split -> (images, labels, ids) of all its batches
    for split, files in present.items():
        x, y, names = zip(*(read_batch(folder / f, label_key, num_classes) for f in files))
        pools[split] = np.concatenate(x), np.concatenate(y), [n for part in names for n in part]
    keep, parts = split_sources({s: p[1] for s, p in pools.items()}, split_options, fresh_split)
    images = np.concatenate([pools[s][0][k] for s, k in keep.items()])
    labels = np.concatenate([pools[s][1][k] for s, k in keep.items()])
    ids = [pools[s][2][i] for s, k in keep.items() for i in k]
    prov = _provenance(src, folder, spec, present, fresh_split, split_options,
                       {"variant": variant, "label_type": label_type,
                        "download": download_missing, "dtype": dtype})
    return write_dataset(out, name=name or variant, classes=classes, converter="data_prep.cifar",
                         provenance=prov, images=images, labels=labels, parts=parts, ids=ids,
                         dtype=dtype)


def _provenance(src, folder, spec, present, fresh_split, split_options, options):
    """Provenance: the files present (with sha256) and where the test split came from."""
    files = [f for fs in spec["splits"].values() for f in fs] + [spec["meta"]]
    sources = [provenance.file_record(folder / f, src) for f in files if (folder / f).is_file()]
    official = "test" in present and not fresh_split
    test_fraction = split_options.test_fraction
    if not official and test_fraction is None:
        test_fraction = DEFAULT_TEST_FRACTION
    origin = ("official test batch" if official else
              "drawn from the training batches (seeded, stratified)" if "test" not in present
              else "drawn from the pooled training and test batches (--fresh-split)")
    options = {"src": str(src), **options, "fresh_split": fresh_split,
               **asdict(split_options), "test_fraction": test_fraction,
               "official_test_kept": official}
    return provenance.build("data_prep.cifar", options, sources, root=src,
                            files_present=[s["path"] for s in sources],
                            files_missing=[f for f in files if not (folder / f).is_file()],
                            test_split=origin)


def locate(src, variant=None):
    """``(variant, folder holding the batches)`` under ``src``; ``variant`` None detects it."""
    for name in [variant] if variant else list(VARIANTS):
        folder = _folder(src, name)
        if folder is not None:
            return name, folder
    wanted = variant or "cifar10 or cifar100"
    raise PrepError(f"{src}: no {wanted} python batches here (expected data_batch_1..5 and "
                    f"test_batch, or train and test, possibly in cifar-10-batches-py/ or "
                    f"cifar-100-python/); add --download to fetch them")


def _folder(src, variant):
    """``src`` or its archive sub-folder, whichever holds the first training batch, else None."""
    spec = VARIANTS[variant]
    for folder in (src, src / spec["folder"]):
        if (folder / spec["splits"]["train"][0]).is_file():
            return folder
    return None


def read_batch(path, label_key, num_classes):
    """``(images (N, 3, 32, 32) uint8, labels (N,) int64, ids)`` of one pickled batch."""
    return read_cifar_batch(path, label_key, num_classes)


def _class_names(meta_path, names_key, num_classes):
    """Class names from the meta file, or the label numbers when it is absent."""
    if not meta_path.is_file():
        log.info("%s is missing: class names will be the label numbers", meta_path)
        return [str(i) for i in range(num_classes)]
    meta = load_pickle(meta_path)
    names = meta.get(names_key)
    if names is None or len(names) != num_classes:
        raise PrepError(f"{meta_path}: expected {num_classes} class names under {names_key!r}; "
                        f"found keys {sorted(meta)}")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def fetch(variant, src):
    """Download and md5-check the ``variant`` archive into ``src`` and extract its batches."""
    if _folder(src, variant) is not None:
        return
    spec = VARIANTS[variant]
    files = [f for fs in spec["splits"].values() for f in fs] + [spec["meta"]]
    archive = download.fetch(spec["archive"], MIRRORS, spec["md5"], src)
    folder = src / spec["folder"]
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():  # only the known batch files, never other paths
                member_path = Path(member.name)
                if member.isfile() and member_path.parent.as_posix() == spec["folder"] \
                        and member_path.name in files:
                    with atomic_path(folder / member_path.name) as tmp:
                        tmp.write_bytes(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError) as err:
        raise PrepError(f"{archive}: cannot extract ({err})") from err
