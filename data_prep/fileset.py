"""The common path of file-per-sample converters (images, NIfTI): select, load, split, write."""

import logging
from dataclasses import asdict

import numpy as np

from data_prep import provenance, sources
from data_prep.errors import PrepError
from data_prep.output import write_dataset
from data_prep.splits import DEFAULT_TEST_FRACTION, split, subsample
from ddmpi.data.schema import SPLITS, to_stored

log = logging.getLogger(__name__)


def select(records, classes, split_options):
    """``(records, classes, labels)``: labels encoded, then at most ``limit`` records kept."""
    classes, labels = sources.encode_labels(records, classes)
    keep = subsample(labels, split_options.limit, split_options.seed)
    return [records[i] for i in keep], classes, labels[keep]


def _parts(records, labels, split_options, groups):
    """Split indices: the manifest's split column when it has one, else drawn (seeded)."""
    if records[0].split is None:
        test = DEFAULT_TEST_FRACTION if split_options.test_fraction is None \
            else split_options.test_fraction
        return split(labels, split_options.val_fraction, test, split_options.seed, groups)
    if split_options.test_fraction is not None:
        raise PrepError("--test-fraction does not apply with a split column (its splits are "
                        "kept as they are)")
    names = np.asarray([r.split for r in records])
    parts = {s: np.flatnonzero(names == s) for s in SPLITS}
    empty = [s for s, idx in parts.items() if len(idx) == 0]
    manifest = records[0].origin.split(" line ")[0]
    if empty:  # all rows of a split fell to --limit
        raise PrepError(f"{manifest}: split {empty[0]!r} has no samples left (after --limit)")
    untrained = sorted({r.label for r in records} - {records[i].label for i in parts["train"]})
    if untrained:
        raise PrepError(f"{manifest}: the split column gives class {untrained[0]!r} no "
                        f"training samples")
    return parts


def convert(out, records, classes, labels, load, *, converter, options, root, split_options,
            name, manifest=None, libraries=(), dtype="float32"):
    """Load every record with ``load(path) -> (array, info)``, split and write; return a summary.

    All arrays must have one shape. ``info`` (a dict) goes into the record's provenance entry.
    Groups (when the records have them) are kept on one side of every split.
    """
    log.info("loading %d files from %s", len(records), root)
    images, entries = None, []
    for i, record in enumerate(records):
        array, info = load(record.path)
        if images is None:
            images = np.empty((len(records),) + array.shape, dtype=dtype)
        elif array.shape != images.shape[1:]:
            raise PrepError(f"{record.path}: loaded as {array.shape} (C, D, H, W or C, H, W), "
                            f"but {records[0].path} as {images.shape[1:]}; resample all to one "
                            f"shape with --shape X Y Z (NIfTI, x y z order) or --size HxW")
        images[i] = to_stored(array, dtype)
        entries.append(provenance.file_record(record.path, root, label=record.label, **info))
    grouped = records[0].group is not None
    groups = np.asarray([r.group for r in records]) if grouped else None
    parts = _parts(records, labels, split_options, groups)
    options = {**options, **asdict(split_options)}
    if records[0].split is not None:  # the manifest's splits were kept, no fraction applied
        options["val_fraction"] = None
    extra = {"manifest": provenance.file_record(manifest, root)} if manifest else {}
    prov = provenance.build(converter, options, entries, root=root, libraries=libraries, **extra)
    return write_dataset(out, name=name, classes=classes, converter=converter, provenance=prov,
                         images=images, labels=labels, parts=parts, groups=groups,
                         ids=[r.id for r in records], dtype=dtype)
