"""The run directory: its checks, per-rank logs, and where every file of a run lives."""

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

from ddmpi.config import ConfigError, differences, dump, load_config, to_dict
from ddmpi.data.atomic import write_text
from ddmpi.data.schema import dataset_fingerprint

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
           "history.json", "test_correct.npz", "dataset.json", "segments.json")
# a run's own files (logs are appended to)


def holds_a_run(run_dir):
    """Whether ``run_dir`` holds a run to continue (or finished): its configuration and a
    :func:`trained_state` (a directory where nothing was trained, say after a configuration
    error, holds none)."""
    return (Path(run_dir) / "config.yaml").is_file() and trained_state(run_dir) is not None


def trained_state(run_dir):
    """What ``run_dir`` holds of a trained run: "finished" (its metrics.json), "unfinished" (a
    checkpoint) or None (nothing trained: a new run there loses nothing)."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").is_file():
        return "finished"
    return "unfinished" if any(run_dir.glob("checkpoints/*.pt")) else None


def read_json(path):
    """The JSON content of the run file ``path``; a :class:`RunDirError` naming it if it is
    not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RunDirError(f"{path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path}: not valid JSON ({err})") from None


def start_segment(run_dir, ranks, resumed, strategy):
    """Record in ``RUN_DIR/segments.json`` that a segment of the run of ``strategy`` starts (a
    fresh run starts the list anew)."""
    path = Path(run_dir) / "segments.json"
    segments = read_json(path) if resumed and path.is_file() else []
    segments.append({"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "ranks": ranks, "resumed": resumed, "strategy": strategy,
                     "wall_seconds": None, "end": None})
    write_text(path, json.dumps(segments, indent=2))


def end_segment(run_dir, wall_seconds, end, signal=None):
    """Record the wall time and the ``end`` ("finished", or "signal" with the ``signal`` that
    stopped it, in words) of the current segment; return every segment so far."""
    path = Path(run_dir) / "segments.json"
    segments = read_json(path)
    segments[-1].update(wall_seconds=wall_seconds, end=end)
    if signal is not None:
        segments[-1]["signal"] = signal
    write_text(path, json.dumps(segments, indent=2))
    return segments


def recorded_strategy(run_dir):
    """The strategy of the run in ``run_dir``: as its segments.json records it, else (a run
    started before segments recorded it) as its metrics.json does; None if neither does."""
    run_dir = Path(run_dir)
    path = run_dir / "segments.json"
    recorded = [s["strategy"] for s in (read_json(path) if path.is_file() else [])
                if "strategy" in s]
    if not recorded and (run_dir / "metrics.json").is_file():
        recorded = [read_json(run_dir / "metrics.json").get("strategy")]
    return recorded[0] if recorded else None


def check_strategy(run_dir, strategy):
    """On resume: the run in ``run_dir`` is one of ``strategy``, else a RunDirError naming
    both (its checkpoints are another model's)."""
    recorded = recorded_strategy(run_dir)
    if recorded not in (None, strategy):
        raise RunDirError(f"{run_dir} holds a {recorded} run, not a {strategy} run: resume it "
                          f"with the command that started it (ddmpi train runs cnn_dnn; ddmpi "
                          f"compare --resume continues a comparison's runs)")


def check_kind(run_dir, comparison):
    """``run_dir`` holds no run of the other command: for a run (``comparison`` False) no
    comparison's ``seed*/`` runs, for a comparison no run's segments.json; else a RunDirError
    (neither command may write over the other's configuration)."""
    run_dir = Path(run_dir)
    if not comparison and any(run_dir.glob("seed*/*/segments.json")):
        raise RunDirError(f"{run_dir} holds a comparison (seed*/ runs of ddmpi compare), not a "
                          f"run: ddmpi compare --resume {run_dir} continues it; give ddmpi "
                          f"train another run directory")
    if comparison and (run_dir / "segments.json").is_file():
        raise RunDirError(f"{run_dir} holds a run of ddmpi train, not a comparison: give ddmpi "
                          f"compare another run directory")


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


def update_config(run_dir, config):
    """On resume: rewrite ``RUN_DIR/config.yaml`` (atomically) to hold ``config``; return the
    fields in which it differed (``(key, old, new)``)."""
    path = Path(run_dir) / "config.yaml"
    changed = list(differences(to_dict(load_config(path)), to_dict(config)))
    if changed:
        write_text(path, dump(config))
    return changed


# what identifies a data set (not where it is or how it was made: the source paths differ for
# a copy made elsewhere, the storage dtype for uint8 and float32 files of the same images); a
# run recorded before a field existed is not checked on it
IDENTITY = ("classes", "channels", "spatial_shape", "mean", "std", "splits", "fingerprint")


def check_same_dataset(run_dir, record):
    """On resume: the data set of ``record`` (see ``base.dataset_record``) is the one recorded
    in ``RUN_DIR/dataset.json`` (its path may differ); a config error naming both otherwise.

    A fingerprint recorded without ``fingerprint_version`` (before version 2) hashed the stored
    bytes: it is compared with that hash of the file (the storage dtype must be the same)."""
    path = Path(run_dir) / "dataset.json"
    if not path.is_file():
        return
    stored, record = read_json(path), json.loads(json.dumps(record))
    if "fingerprint" in stored and "fingerprint_version" not in stored:
        record["fingerprint"] = dataset_fingerprint(record["path"], stored=True)
    changed = [key for key in IDENTITY if key in stored and stored[key] != record.get(key)]
    if changed:
        raise ConfigError(f"config field 'data.path': {record['path']} is not the data set "
                          f"this run trained on ({stored['path']}, recorded in {path}): its "
                          f"{', '.join(changed)} differ; a resumed run keeps its data set")


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


class RunDirLock:
    """A job's hold on ``RUN_DIR/.lock`` while it runs there, taken by rank 0: an exclusive,
    non-blocking ``flock``, so that a second job on the directory is refused, naming the
    holder (the file's content). The kernel drops it when the process ends, however it ends:
    a crash leaves the file, never a stale lock. ``RunDirLock()`` holds nothing (the other
    ranks); ``notes``: why nothing is held on a file system without locks."""

    def __init__(self, run_dir=None):
        self.file, self.notes = None, []
        if run_dir is not None:
            self._take(Path(run_dir))

    def _take(self, run_dir):
        check_writable(run_dir)
        self.file = open(run_dir / ".lock", "a+")  # noqa: SIM115 (held until close())
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "holder unknown"
            self.close()
            raise RunDirError(f"{run_dir} is in use by another job ({holder})") from None
        except OSError as err:  # say, Lustre mounted without flock
            self.close()
            self.notes.append(f"{run_dir}: its file system takes no lock ({err.strerror}), so "
                              f"another job using it at the same time would go unnoticed")
            return
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
