"""Atomic checkpoint files: a process killed mid-write leaves the previous checkpoint usable."""

from pathlib import Path

import torch

from ddmpi.data.atomic import atomic_path


def save_checkpoint(path, state):
    """Write ``state`` (a dict of tensors and plain values) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by :func:`save_checkpoint`; ``None`` if there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - report which file is damaged, whatever torch raised
        raise ValueError(f"{path}: unreadable checkpoint ({err})") from err
