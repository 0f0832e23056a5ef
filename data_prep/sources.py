"""Where labelled files come from: class sub-folders, a CSV manifest, or file names (regex)."""

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from data_prep.errors import PrepError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One labelled input file; ``origin`` names where its label came from, for messages."""

    path: Path
    label: str
    origin: str
    id: str
    group: Optional[str] = None
    split: Optional[str] = None  # official split from a manifest's split column


SPLIT_VALUES = ("train", "val", "test")


def collect(accept, *, src=None, manifest=None, image_column="image", label_column="label",
            group_column=None, label_regex=None, split_column=None):
    """Records from ``src`` (class folders, or a flat folder with ``label_regex``) or ``manifest``.

    ``accept(path)`` says which files in a folder are inputs; others are skipped.
    """
    if (src is None) == (manifest is None):
        raise PrepError("give exactly one source: a folder (--src) or a CSV manifest (--manifest)")
    if manifest is not None:
        if label_regex is not None:
            raise PrepError("a label regex labels the files of a folder (--src), not a manifest")
        return from_manifest(manifest, image_column, label_column, group_column, split_column)
    if group_column is not None or split_column is not None:
        raise PrepError("group and split columns belong to a manifest (--manifest), not a folder")
    if label_regex is not None:
        return from_file_names(src, label_regex, accept)
    return from_folders(src, accept)


def from_folders(root, accept):
    """One class per sub-folder of ``root``; its accepted files (recursively) are the samples."""
    root = _directory(root)
    folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: natural_key(d.name))
    if not folders:
        raise PrepError(f"{root}: no class sub-folders (for a flat folder, give --label-regex)")
    records = []
    for folder in folders:
        files = _files(folder, accept)
        if not files:
            raise PrepError(f"{folder}: class folder without any input file")
        records += [Record(p, folder.name, str(folder), str(p.relative_to(root))) for p in files]
    _log_skipped(root, accept, len(records))
    return records


def from_file_names(root, regex, accept):
    """Files of ``root`` (recursively), labelled by ``regex`` (group ``label``, else group 1)."""
    root = _directory(root)
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise PrepError(f"label regex {regex!r}: {err}") from err
    if pattern.groups == 0:
        raise PrepError(f"label regex {regex!r} has no group: mark the label part with (...)")
    key = "label" if "label" in pattern.groupindex else 1
    records = []
    for path in _files(root, accept):
        rel = str(path.relative_to(root))
        match = pattern.search(rel)
        if match is None or not match.group(key):
            raise PrepError(f"{path}: its name does not match the label regex {regex!r}")
        records.append(Record(path, match.group(key), str(path), rel))
    if not records:
        raise PrepError(f"{root}: no input files")
    _log_skipped(root, accept, len(records))
    return records


def from_manifest(csv_path, image_column, label_column, group_column=None, split_column=None):
    """Rows of a CSV file: image path (relative to the CSV's folder), label, optional group and
    official split (train/val/test)."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c for c in (image_column, label_column, group_column, split_column) if c]
            absent = [c for c in columns if c not in (reader.fieldnames or [])]
            if absent:
                raise PrepError(f"{csv_path}: no column(s) {absent}; found {reader.fieldnames}")
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PrepError(f"{csv_path}: cannot read the manifest ({err})") from err
    records, seen = [], {}
    for line, row in rows:
        where = f"{csv_path} line {line}"
        values = {c: (row.get(c) or "").strip() for c in columns}
        empty = [c for c, v in values.items() if not v]
        if empty:
            raise PrepError(f"{where}: empty {', '.join(empty)}")
        path = (csv_path.parent / values[image_column])
        if not path.is_file():
            raise PrepError(f"{path}: listed in {where} but missing")
        if path.resolve() in seen:
            raise PrepError(f"{path}: listed twice in {csv_path} (lines {seen[path.resolve()]} "
                            f"and {line})")
        seen[path.resolve()] = line
        records.append(Record(path, values[label_column], where, values[image_column],
                              values[group_column] if group_column else None,
                              values[split_column] if split_column else None))
    if not records:
        raise PrepError(f"{csv_path}: the manifest lists no files")
    if split_column:
        _check_splits(csv_path, records, split_column, group_column)
    return records


def _check_splits(csv_path, records, split_column, group_column):
    """Split cells are train/val/test, each split has rows, no group is in two splits."""
    first = {}
    for record in records:
        if record.split not in SPLIT_VALUES:
            raise PrepError(f"{record.origin}: column {split_column!r}: unknown split "
                            f"{record.split!r} (expected {', '.join(SPLIT_VALUES)})")
        if record.group is not None:
            other = first.setdefault(record.group, record)
            if other.split != record.split:
                raise PrepError(f"{record.origin}: column {split_column!r}: group "
                                f"{record.group!r} (column {group_column!r}) is in split "
                                f"{record.split!r} here but in {other.split!r} at "
                                f"{other.origin}")
    for split in SPLIT_VALUES:
        if not any(r.split == split for r in records):
            raise PrepError(f"{csv_path}: column {split_column!r}: split {split!r} has no rows")


def encode_labels(records, classes=None):
    """``(classes, labels (N,) int64)``; ``classes`` None takes the labels in natural order.

    With ``classes`` given, a label outside them is an error naming where it came from.
    """
    if classes is None:
        classes = sorted({r.label for r in records}, key=natural_key)
    index = {c: i for i, c in enumerate(classes)}
    for record in records:
        if record.label not in index:
            raise PrepError(f"{record.origin}: unknown label {record.label!r} "
                            f"(classes: {', '.join(classes)})")
    labels = np.asarray([index[r.label] for r in records], dtype=np.int64)
    unused = [c for i, c in enumerate(classes) if not np.any(labels == i)]
    if unused:
        log.info("no samples of class(es) %s", ", ".join(unused))
    return list(classes), labels


def natural_key(text):
    """Sort key that puts ``s2`` before ``s10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", text) if part]


def _directory(root):
    root = Path(root)
    if not root.is_dir():
        raise PrepError(f"{root}: not a directory")
    return root


def _files(folder, accept):
    """Accepted, non-hidden files under ``folder``, in natural order."""
    return sorted((p for p in _visible_files(folder) if accept(p)),
                  key=lambda p: natural_key(str(p.relative_to(folder))))


def _visible_files(folder):
    return [p for p in folder.rglob("*") if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def _log_skipped(root, accept, used):
    skipped = [p for p in _visible_files(root) if not accept(p)]
    if skipped:
        log.info("%s: %d input files; skipped %d other file(s), e.g. %s", root, used,
                 len(skipped), skipped[0].relative_to(root))
