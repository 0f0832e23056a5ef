"""Atomic checkpoint files, read back without unpickling code (``weights_only=True``)."""

from pathlib import Path

import torch

from ddmpi.data.atomic import atomic_path


class CheckpointError(ValueError):
    """A checkpoint is unreadable or holds more than tensors and plain values."""


def save_checkpoint(path, state):
    """Write ``state`` (tensors and plain Python values only) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint of tensors and plain values; ``None`` if there is none yet.

    Anything else in the file (a pickled object that could run code) is refused.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - name the file, whatever torch raised
        raise CheckpointError(f"{path}: unreadable or unsafe checkpoint, refused (only tensors and "
                         f"plain values are loaded): {str(err).splitlines()[0]}") from err
