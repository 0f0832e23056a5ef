"""The run directory: its checks, per-rank logs, and where every file of a run lives."""

import logging
import shutil
import sys
import uuid
from pathlib import Path

MIN_FREE_BYTES = 64 << 20


def local_path(run_dir, sub, fold=None):
    """Checkpoint of the local CNN of subdomain ``sub`` (or of its cross-fitting ``fold``)."""
    tail = "" if fold is None else f"_fold{fold}"
    return Path(run_dir) / "checkpoints" / f"local_{sub:03d}{tail}.pt"


def global_path(run_dir):
    return Path(run_dir) / "checkpoints" / "global.pt"


def coarse_path(run_dir):
    return Path(run_dir) / "checkpoints" / "coarse.pt"


def decisions_path(run_dir, sub):
    return Path(run_dir) / "decisions" / f"local_{sub:03d}.npz"


OUTPUTS = ("checkpoints", "decisions", "scalars", "tensorboard", "plots", "metrics.json",
           "history.json", "test_correct.npz", "dataset.json")
# a run's own files (logs are appended to)


def clear_outputs(run_dir):
    """Remove an earlier run's outputs from ``run_dir`` (a new run there must not leave, say,
    a 3x3 run's subdomains 4..8 beside its own 4); return the names removed."""
    removed = []
    for name in OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


class RunDirError(ValueError):
    """The run directory cannot hold this run (unwritable, full, or holds a different run)."""


def check_writable(run_dir, min_free_bytes=MIN_FREE_BYTES):
    """Create ``run_dir`` if needed and make sure files can be written there; raise otherwise."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"run directory {run_dir} is not writable: {err.strerror}") from err
    free = shutil.disk_usage(run_dir).free
    if free < min_free_bytes:
        raise RunDirError(f"run directory {run_dir}: only {free >> 20} MiB free on its file "
                          f"system, need at least {min_free_bytes >> 20} MiB")


def rank_logger(run_dir, rank, console=False):
    """Logger writing to ``RUN_DIR/logs/rank_XXXXX.log`` (and to stdout when ``console``)."""
    logger = logging.getLogger(f"ddmpi.rank{rank}")
    logger.handlers.clear()
    logger.setLevel(logging.DEBUG)  # file: everything; console: INFO and above
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s")
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / f"rank_{rank:05d}.log")
    handler.setFormatter(fmt)
    logger.addHandler(handler)
    if console:
        stream = logging.StreamHandler(sys.stdout)
        stream.setLevel(logging.INFO)
        stream.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(stream)
    return logger


def log_to_file(rank, level, message):
    """Write ``message`` to this rank's log file alone (not the console), if
    :func:`rank_logger` opened one in this process (a run directory is open)."""
    logger = logging.getLogger(f"ddmpi.rank{rank}")
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
