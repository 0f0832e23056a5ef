"""Atomic checkpoint files, read back without unpickling code (``weights_only=True``)."""

import re
import zipfile
from pathlib import Path

import torch

from ddmpi.data.atomic import atomic_path

UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+)")  # in torch's weights_only refusal


class CheckpointError(ValueError):
    """A checkpoint is unreadable or holds more than tensors and plain values."""


def save_checkpoint(path, state):
    """Write ``state`` (tensors and plain Python values only) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint of tensors and plain values; ``None`` if there is none yet.

    Anything else in the file (a pickled object that could run code) is refused; the error
    names the file and never suggests loading it unsafely.
    """
    path = Path(path)
    if not path.exists():
        return None
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise CheckpointError(f"{path}: not a ddmpi checkpoint, or corrupt (not a PyTorch "
                              f"checkpoint archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - name the file, whatever torch raised
        raise CheckpointError(_refusal(path, err)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a ddmpi checkpoint (holds a {type(state).__name__}, "
                              f"not a dict of states)")
    return state


def _refusal(path, err):
    """One line on why ``path`` was not loaded, without torch's advice to load it unsafely."""
    unsafe = UNSAFE_GLOBAL.search(str(err))
    if unsafe:
        return (f"{path}: unsafe checkpoint, refused: it holds {unsafe.group(1)}, not only "
                f"tensors and plain values (loading it could run code)")
    return f"{path}: not a ddmpi checkpoint, or corrupt ({type(err).__name__})"
