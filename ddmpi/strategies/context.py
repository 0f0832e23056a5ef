"""What every training command does before its own work: the run directory, per-rank logs,
the data set's header, the device binding, phase timers and the common head of ``metrics.json``.

``ddmpi train`` (:mod:`ddmpi.strategies.cnn_dnn`), the global baseline (:mod:`ddmpi.strategies.global_ddp`) and the
coherent CNN-DNN (:mod:`ddmpi.strategies.coherent`) all start with :func:`open_run`, so their run
directories share one layout (``config.yaml``, ``dataset.json``, ``logs/rank_XXXXX.log``) and
``ddmpi predict`` reads any of them.
"""

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from logging import Logger
from pathlib import Path

import torch

from ddmpi.parallel import cluster
from ddmpi.data.atomic import write_text
from ddmpi.config import ConfigError, dump, to_dict
from ddmpi.data.decomposition import Decomposition
from ddmpi.strategies.rundir import check_writable, rank_logger
from ddmpi.data.schema import DatasetInfo, read_info

SPLITS = ("train", "val", "test")


class PhaseTimer:
    """Wall time of named phases on this rank."""

    def __init__(self):
        self.seconds = {}

    @contextmanager
    def __call__(self, phase):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def collective_check(comm, func, *args):
    """Run ``func`` on rank 0 only; every rank raises the error rank 0 met (no rank waits)."""
    error = None
    if comm.rank == 0:
        try:
            func(*args)
        except (ValueError, OSError) as err:
            error = err
    error = comm.bcast(error, root=0)
    if error is not None:
        raise error


def dataset_record(info):
    """What ``ddmpi predict`` needs of the training data set: classes, shape, statistics and
    the converter's preprocessing options (image size and mode, HU window, target shape)."""
    provenance = json.loads(info.attrs.get("provenance", "{}") or "{}")
    return {"path": str(info.path), "name": info.name, "classes": info.classes,
            "channels": info.channels, "spatial_shape": list(info.spatial_shape),
            "mean": info.mean.tolist(), "std": info.std.tolist(),
            "preprocessing": provenance.get("options", {}), "converter": info.attrs.get(
                "converter")}


@dataclass
class RunContext:
    """One rank's view of an opened run."""

    run_dir: Path
    log: Logger
    info: DatasetInfo
    binding: cluster.Binding
    amp: bool

    @property
    def device(self) -> torch.device:
        return self.binding.device


def open_run(config, comm, run_dir, *, keep_stored_config=False) -> RunContext:
    """Collective over ``comm``: check ``run_dir`` is writable (rank 0; every rank raises its
    error), write ``config.yaml`` (unless ``keep_stored_config`` and one exists: a resumed run
    keeps its own) and ``dataset.json``, open this rank's log, read the data set's header and
    check it has the three splits, bind the device and threads (``run.device``,
    ``run.threads_per_rank``) and decide mixed precision (``run.amp``)."""
    run_dir = Path(run_dir)
    rank = comm.rank
    collective_check(comm, check_writable, run_dir)
    if rank == 0 and not (keep_stored_config and (run_dir / "config.yaml").exists()):
        write_text(run_dir / "config.yaml", dump(config))
    comm.Barrier()
    log = rank_logger(run_dir, rank, console=(rank == 0))
    info = read_info(config.data.path)
    for split in SPLITS:
        if split not in info.splits:
            raise ConfigError(f"config field 'data.path': {info.path} has no {split!r} "
                              f"split (it has {list(info.splits)})")
    binding = cluster.bind_process(comm, config.run.device, config.run.threads_per_rank)
    amp = config.run.amp is True or (config.run.amp == "auto" and binding.device.type == "cuda")
    log.info(f"{binding}{' amp=bf16' if amp else ''}")
    if rank == 0:
        write_text(run_dir / "dataset.json", json.dumps(dataset_record(info), indent=2))
    return RunContext(run_dir, log, info, binding, amp)


def decomposition_of(config, info):
    """The configured :class:`~ddmpi.data.decomposition.Decomposition` of the data set's images;
    a grid that does not fit them is an error naming the config field."""
    grid = config.decomposition.grid
    if len(grid) != info.spatial_dims:
        raise ConfigError(f"config field 'decomposition.grid': {grid} has {len(grid)} axes, "
                          f"but {info.path} holds {info.spatial_dims}D images "
                          f"{info.spatial_shape}")
    try:
        return Decomposition(info.spatial_shape, grid, config.decomposition.overlap)
    except ValueError as err:
        raise ConfigError(f"config field 'decomposition': {err}") from err


def metrics_head(config, info, ranks, decomposition=None):
    """The first entries of every run's ``metrics.json``: version, configuration, data set,
    decomposition (where there is one) and number of ranks."""
    head = {"ddmpi_version": __import__("ddmpi").__version__,
            "config": to_dict(config),
            "dataset": {"path": str(info.path), "name": info.name, "classes": info.classes,
                        "spatial_shape": list(info.spatial_shape), "splits": info.splits}}
    if decomposition is not None:
        head["decomposition"] = {"grid": list(decomposition.grid),
                                 "overlap": list(decomposition.overlap),
                                 "num_subdomains": decomposition.num_subdomains}
    head["ranks"] = ranks
    return head
