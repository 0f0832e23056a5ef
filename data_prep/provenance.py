"""Provenance of a converted data set: sha256 of every input, the options, library versions."""

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

from data_prep.errors import PrepError

CHUNK = 1 << 20


def sha256_file(path):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path, root=None, **extra):
    """``{"path", "bytes", "sha256", **extra}`` of one input (``path`` relative to ``root``)."""
    path = Path(path)
    try:
        digest, size = sha256_file(path), path.stat().st_size
    except OSError as err:
        raise PrepError(f"{path}: cannot read ({err.strerror or err})") from err
    shown = Path(os.path.abspath(path))  # lexical: a symlinked input keeps its name
    if root is not None and shown.is_relative_to(os.path.abspath(root)):
        shown = shown.relative_to(os.path.abspath(root))
    return {"path": str(shown), "bytes": size, "sha256": digest, **extra}


def build(converter, options, sources, root=None, libraries=(), **extra):
    """The ``provenance`` JSON object of a data set (stored by ``DatasetWriter``)."""
    return {
        "converter": converter,
        "options": options,
        "source_root": os.path.abspath(root) if root is not None else None,
        "sources": sources,
        "python": platform.python_version(),
        "libraries": {lib: metadata.version(lib) for lib in ("numpy", "h5py", *libraries)},
        **extra,
    }
