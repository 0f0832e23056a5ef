"""The run skeleton every strategy plugs into, and the one result type ``compare`` reads.

    open run (directory, logs, data set, binding) -> strategy.train() -> preemption point
    -> strategy.evaluate() -> gather timings -> metrics.json, history.json, scalars, plots
"""

import json
import time
from abc import ABC, abstractmethod
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ddmpi.config import ConfigError, dump, to_dict
from ddmpi.data.atomic import write_text
from ddmpi.data.augment import Augmenter, AugmentError
from ddmpi.data.decomposition import Decomposition
from ddmpi.data.reader import check_contents
from ddmpi.data.schema import FINGERPRINT_VERSION, SPLITS, dataset_fingerprint, read_info
from ddmpi.parallel import cluster
from ddmpi.report import output as report
from ddmpi.strategies.rundir import (
    RunDirError,
    RunDirLock,
    check_kind,
    check_same_dataset,
    check_strategy,
    clear_outputs,
    end_segment,
    holds_a_run,
    rank_logger,
    read_json,
    start_segment,
    trained_state,
    update_config,
)
from ddmpi.training import memory, preemption
from ddmpi.training.loop import Preempted, Step


@dataclass
class RunResult:
    """What any strategy's run produced, as rank 0 reports it."""

    strategy: str
    combiners: Dict[str, dict]            # name -> test metrics (accuracy, AUC, ...)
    test_correct: Dict[str, np.ndarray]   # name -> (N,) bool: per-sample test correctness
    parameters: int                       # all trained parameters of the strategy
    flops_per_sample: Optional[float]     # training FLOPs (forward + backward) per sample
    history: Dict[str, List[dict]]        # name -> per-epoch records (with "elapsed")
    extra: dict = field(default_factory=dict)
    wall_seconds: float = 0.0             # over the segments (a resumed run has several)
    segments: List[dict] = field(default_factory=list)  # RUN_DIR/segments.json
    # of the last segment: rank -> phase -> seconds; rank -> {"rss", "rss_scope" ("run", or
    # "process" where the peak could not be reset: ddmpi.training.memory), "cuda"} MiB
    timings: Dict[str, dict] = field(default_factory=dict)
    peak_memory_mb: Dict[str, dict] = field(default_factory=dict)

    def metrics(self):
        """metrics.json's body (per-sample arrays left out)."""
        body = asdict(self)
        body.pop("test_correct")
        return body


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


@dataclass
class RunContext:
    """One rank's view of an opened run."""

    config: object
    world: object          # ddmpi.parallel.group.Group
    run_dir: Path
    log: object
    info: object           # ddmpi.data.schema.DatasetInfo
    binding: object
    resume: bool
    finished: bool = False  # resumed after it finished: nothing to do
    lock: RunDirLock = field(default_factory=RunDirLock)  # rank 0's hold on the directory
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    start: float = field(default_factory=time.perf_counter)

    @property
    def device(self):
        return self.binding.device

    def step(self, **kwargs):
        """The :class:`~ddmpi.training.loop.Step` of this run's device and precision."""
        run = self.config.run
        cuda = self.device.type == "cuda"
        amp = run.amp is True or (run.amp == "auto" and cuda)
        channels_last = run.channels_last is True or (
            run.channels_last == "auto" and cuda and self.info.spatial_dims == 2)
        return Step(self.device, amp=amp, channels_last=channels_last, compile=run.compile,
                    **kwargs)

    def decomposition(self):
        return decomposition_of(self.config, self.info)

    def elapsed(self):
        return time.perf_counter() - self.start

    def preemption_point(self):
        """Collective: leave (checkpoints are on disk) if any rank was signalled."""
        if self.world.any(preemption.requested()):
            raise Preempted("signal received between phases")


class Strategy(ABC):
    """One way to train a classifier on the run's data; plugs into :func:`run`."""

    name = "strategy"

    @classmethod
    def check_fit(cls, config, info, ranks):
        """The configuration fits the data set and the ``ranks``, else an error: checked before
        the run directory is touched. Returns the decomposition."""
        return decomposition_of(config, info)

    def __init__(self, ctx):
        self.ctx = ctx

    @abstractmethod
    def train(self):
        """Train (collective over ``ctx.world``)."""

    @abstractmethod
    def evaluate(self):
        """Evaluate on the test split; return a :class:`RunResult` on rank 0, None elsewhere."""


def run(strategy_cls, config, world, resume=False, overwrite=False):
    """Run ``strategy_cls`` on the ranks of ``world``, holding the run directory's lock; the
    result on rank 0, None elsewhere (a run resumed after it finished: the result it wrote,
    read back)."""
    ctx = open_run(config, world, resume, strategy_cls, overwrite)
    with ctx.lock:
        if ctx.finished:
            return read_result(ctx.run_dir) if world.rank == 0 else None
        return run_opened(strategy_cls, ctx)


def run_opened(strategy_cls, ctx):
    """Train, evaluate and report the run of the opened ``ctx`` (see :func:`run`)."""
    world = ctx.world
    preemption.install()
    scope = memory.reset_peaks(ctx.device)
    strategy = strategy_cls(ctx)
    try:
        with ctx.timer("train"):
            strategy.train()
        ctx.preemption_point()
        with ctx.timer("evaluate"):
            result = strategy.evaluate()
    except Preempted:
        if world.rank == 0:
            end_segment(ctx.run_dir, ctx.elapsed(), "signal", preemption.describe())
        raise
    timings = world.gather(dict(ctx.timer.seconds))
    peaks = world.gather(memory.peaks_mb(ctx.device, scope))
    if world.rank != 0:
        return None
    result.segments = end_segment(ctx.run_dir, ctx.elapsed(), "finished")
    result.wall_seconds = sum(s["wall_seconds"] or 0.0 for s in result.segments)
    result.timings = {str(r): t for r, t in enumerate(timings)}
    result.peak_memory_mb = {str(r): m for r, m in enumerate(peaks)}
    write_outputs(ctx, result)
    return result


def open_run(config, world, resume=False, strategy_cls=Strategy, overwrite=False):
    """Collective: the checks of :func:`check_run`, binding device and threads, then (nothing
    in the run directory changes before they pass) taking its lock (:func:`lock_run_dir`,
    held by the returned context), preparing it (:func:`prepare_run_dir`) and opening this
    rank's log."""
    run_dir = Path(config.run.dir)
    info = check_run(config, strategy_cls, world.size)
    binding = cluster.bind_process(world, config.run.device, config.run.threads_per_rank)
    with ExitStack() as unlock_on_error:
        lock = unlock_on_error.enter_context(lock_run_dir(run_dir, world))
        state, notes = on_root(world, prepare_run_dir, config, info, resume, world.size,
                               strategy_cls.name, overwrite)
        log = rank_logger(run_dir, world.rank, console=world.rank == 0)
        unlock_on_error.pop_all()
    for note in lock.notes + notes:
        log.warning(note)
    log.info(str(binding))
    if config.run.amp is True and binding.device.type != "cuda":
        log.warning(f"run.amp: bf16 autocast is for CUDA; {binding.device} trains in float32")
    return RunContext(config, world, run_dir, log, info, binding, state == "resumed",
                      state == "finished", lock)


def check_run(config, strategy_cls, ranks):
    """What is checked before the run directory is touched: the data set's header, its
    splits, ``data.augment``, and that the configuration fits the data set and the ``ranks``
    (``strategy_cls.check_fit``). Returns the data set's :class:`DatasetInfo`."""
    info = read_info(config.data.path)
    missing = [s for s in SPLITS if s not in info.splits]
    if missing:
        raise ConfigError(f"config field 'data.path': {info.path} has no {missing[0]!r} split "
                          f"(it has {list(info.splits)})")
    _check_augment(config, info)
    strategy_cls.check_fit(config, info, ranks)
    return info


def lock_run_dir(run_dir, world):
    """Collective: ``run_dir``'s :class:`~ddmpi.strategies.rundir.RunDirLock`, taken by rank 0
    (the other ranks' holds nothing) and held until closed; another job holding it, or an
    unwritable directory, is an error raised on every rank."""
    lock, error = RunDirLock(), None
    if world.rank == 0:
        try:
            lock = RunDirLock(run_dir)
        except (ValueError, OSError) as err:
            error = err
    error = world.bcast(error)
    if error is not None:
        raise error
    return lock


def on_root(world, fn, *args):
    """Collective: ``fn(*args)`` on rank 0, its value on every rank; a ValueError or OSError
    it raises is raised on every rank."""
    outcome = None
    if world.rank == 0:
        try:
            outcome = fn(*args)
        except (ValueError, OSError) as err:
            outcome = err
    outcome = world.bcast(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def prepare_run_dir(config, info, resume, ranks, strategy, overwrite=False):
    """Rank 0, holding the run directory's lock: check it and store the configuration and the
    data set's record; return the run's state ("new"; "resumed": ``resume`` and a run there;
    "finished": that run had finished, nothing to do) and notes to log.

    A continued run must be of the same ``strategy`` (the name of its class) and data set
    (under any path); a new one replaces an earlier run's outputs (:func:`clear_earlier`)."""
    run_dir = Path(config.run.dir)
    check_kind(run_dir, comparison=False)
    record = dataset_record(info)
    if resume and holds_a_run(run_dir):
        check_strategy(run_dir, strategy)
        check_same_dataset(run_dir, record)
        if trained_state(run_dir) == "finished":
            return "finished", [f"{run_dir}: the run finished in an earlier job, nothing to "
                                f"resume; its metrics: {run_dir / 'metrics.json'}"]
        state, notes = "resumed", []
        changed = update_config(run_dir, config)
        if changed:
            notes.append("resumed with changed fields (config.yaml updated): " + ", ".join(
                f"{key} {old!r} -> {new!r}" for key, old, new in changed))
    else:
        notes, state = clear_earlier(run_dir, info, resume, overwrite), "new"
        write_text(run_dir / "config.yaml", dump(config))
    write_text(run_dir / "dataset.json", json.dumps(record, indent=2))
    start_segment(run_dir, ranks, state == "resumed", strategy)
    return state, notes


def clear_earlier(run_dir, info, resume, overwrite):
    """Rank 0, before a new run: remove an earlier run's outputs from ``run_dir``; notes to log.
    A trained run there (:func:`~ddmpi.strategies.rundir.trained_state`) is replaced only with
    ``overwrite``, after the data set's contents passed the readers' checks (a run that fails
    on them must not have cost it)."""
    stored, trained = (run_dir / "config.yaml").exists(), trained_state(run_dir)
    if resume and trained and not stored:
        raise RunDirError(f"{run_dir}: a trained run ({trained}) without config.yaml, so it "
                          f"cannot be resumed; restore config.yaml, or replace the run with "
                          f"--overwrite")
    if trained and not overwrite:
        raise RunDirError(f"{run_dir} holds a trained run ({trained}): give --resume to "
                          f"continue it or --overwrite to replace it")
    if trained:
        check_contents(info.path)
    notes = []
    if resume and stored:
        notes.append(f"{run_dir} holds no checkpoint: nothing to resume, starting the run "
                     f"afresh with the given configuration")
    replaced = clear_outputs(run_dir) if stored or trained else []
    if replaced:
        notes.append(f"{run_dir} held an earlier run: its {', '.join(replaced)} were removed")
    return notes


def _check_augment(config, info):
    """data.augment fits the data's images (its flip axes exist), else a config error."""
    try:
        Augmenter(config.data.augment, info.spatial_shape, config.run.seed)
    except AugmentError as err:
        raise ConfigError(f"config field 'data.augment.{err.field}': {err} ({info.path})") \
            from None


def dataset_record(info):
    """What ``ddmpi predict`` needs of the training data (classes, shape, statistics, options)
    and what identifies it on resume (also split sizes and a fingerprint of labels and ids)."""
    provenance = json.loads(info.attrs.get("provenance", "{}") or "{}")
    return {"path": str(info.path), "name": info.name, "classes": info.classes,
            "channels": info.channels, "spatial_shape": list(info.spatial_shape),
            "mean": info.mean.tolist(), "std": info.std.tolist(),
            "preprocessing": provenance.get("options", {}),
            "converter": info.attrs.get("converter"), "splits": dict(info.splits),
            "fingerprint": dataset_fingerprint(info.path),
            "fingerprint_version": FINGERPRINT_VERSION}


def decomposition_of(config, info):
    """The configured decomposition of the data set's images (errors name the field)."""
    grid = config.decomposition.grid
    if len(grid) != info.spatial_dims:
        raise ConfigError(f"config field 'decomposition.grid': {grid} has {len(grid)} axes, "
                          f"but {info.path} holds {info.spatial_dims}D images "
                          f"{info.spatial_shape}")
    try:
        return Decomposition(info.spatial_shape, grid, config.decomposition.overlap)
    except ValueError as err:
        raise ConfigError(f"config field 'decomposition': {err}") from err


def model_title(result):
    """What a run's training curves show, for plot titles."""
    if result.strategy == "cnn_dnn":
        return "local CNNs"
    name = {"global_ddp": "global CNN", "coherent": "coherent CNN-DNN",
            "coherent_transfer": "coherent CNN-DNN, transfer"}.get(result.strategy,
                                                                  result.strategy)
    width = result.extra.get("width")
    return name if width is None else f"{name} (width {width})"


def write_outputs(ctx, result):
    """History, per-sample correctness, plots and, last (a run with one has finished: see
    :func:`read_result`), metrics.json of a finished run."""
    run_dir, config, info = ctx.run_dir, ctx.config, ctx.info
    report.write_metrics(run_dir / "history.json", result.history)
    report.save_arrays(run_dir / "test_correct.npz", result.test_correct)
    report.plot_training_curves(run_dir / "plots" / "training_curves.png", result.history,
                                model_title(result))
    if len(result.combiners) > 1:  # one model's single bar would show nothing
        report.plot_accuracy_by_combiner(
            run_dir / "plots" / "accuracy_by_combiner.png",
            {name: m["accuracy"] for name, m in result.combiners.items()},
            result.extra.get("local_test_accuracy"))
    for name, m in result.combiners.items():
        report.plot_confusion(run_dir / "plots" / f"confusion_{name}.png",
                              m["confusion_matrix"], info.classes, f"{name} (test)")
    metrics = {"ddmpi_version": __import__("ddmpi").__version__, "config": to_dict(config),
               "dataset": json.loads((run_dir / "dataset.json").read_text()),
               "ranks": ctx.world.size, **result.metrics()}
    report.write_metrics(run_dir / "metrics.json", metrics)
    ctx.log.info("\n" + report.results_table(
        {name: m["accuracy"] for name, m in result.combiners.items()}))
    segments = len(result.segments)
    over = f" over {segments} segments" if segments > 1 else ""
    ctx.log.info(f"run directory: {run_dir} ({result.wall_seconds:.1f} s{over})")


def read_result(run_dir):
    """The :class:`RunResult` of a finished run, read back from what :func:`write_outputs`
    wrote (metrics.json and test_correct.npz)."""
    path = Path(run_dir) / "metrics.json"
    body = read_json(path)
    names = [f.name for f in fields(RunResult) if f.name != "test_correct"]
    missing = [name for name in names if name not in body]
    if missing:
        raise RunDirError(f"{path}: no {missing[0]!r}; not the metrics.json of a finished run")
    with np.load(Path(run_dir) / "test_correct.npz") as arrays:
        correct = {name: arrays[name] for name in arrays.files}
    return RunResult(test_correct=correct, **{name: body[name] for name in names})
