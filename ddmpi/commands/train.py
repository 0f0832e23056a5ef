"""``ddmpi train``: resolve the configuration (fresh or resumed) and run the CNN-DNN strategy."""

from pathlib import Path

from ddmpi.cli import RESUME_IF_POSSIBLE
from ddmpi.commands import exit_preempted
from ddmpi.config import ConfigError, differences, load_config, to_dict
from ddmpi.strategies.base import run
from ddmpi.strategies.cnn_dnn import CNNDNN
from ddmpi.strategies.rundir import holds_a_run
from ddmpi.training import preemption
from ddmpi.training.loop import Preempted

# Fields a resumed run may change: where and how it runs, not what it computes (data.path:
# the same data set under another path, checked by its identity when the run opens).
RESUMABLE = {"run.dir", "run.device", "run.threads_per_rank", "run.gather_chunk_mb",
             "run.tensorboard", "run.compile", "data.path", "data.in_memory",
             "data.memory_budget_gb"}


def resolve_config(config_path, overrides, resume_dir):
    """The run's configuration: from ``--config``/``--set``, or the one stored in ``resume_dir``.

    On resume, a value that differs from the stored one in a field that shapes the run is an
    error naming the field: the checkpoints belong to the stored configuration. A directory
    without a checkpoint holds no run to keep: its stored configuration binds nothing.
    """
    if resume_dir is None:
        if config_path is None:
            raise ConfigError("ddmpi train: give --config FILE (or --resume RUN_DIR)")
        return load_config(config_path, overrides)
    stored = Path(resume_dir) / "config.yaml"
    if config_path is None and not stored.exists():
        raise ConfigError(f"{resume_dir}: no config.yaml to resume from")
    config = load_config(config_path or stored, [f"run.dir={resume_dir}", *overrides])
    if Path(config.run.dir).resolve() != Path(resume_dir).resolve():
        raise ConfigError(f"--resume {resume_dir} and run.dir {config.run.dir} (--run-dir or "
                          f"--set) name different run directories; give the one to resume")
    if holds_a_run(resume_dir):
        for key, old, new in differences(to_dict(load_config(stored)), to_dict(config)):
            if key not in RESUMABLE:
                raise ConfigError(f"config field '{key}': {new!r} differs from {old!r} stored "
                                  f"in {stored}; a resumed run keeps its configuration")
    return config


def main(args, world):
    """Entry of ``ddmpi train``; exits 75 after a preemption (checkpoints written)."""
    overrides = list(args.set or []) + ([f"run.dir={args.run_dir}"] if args.run_dir else [])
    resume_dir = args.resume
    if resume_dir == RESUME_IF_POSSIBLE:  # --resume alone: --run-dir, else the config's run.dir
        resume_dir = args.run_dir or load_config(args.config, overrides).run.dir
    config = resolve_config(args.config, overrides, resume_dir)
    try:
        run(CNNDNN, config, world, resume=resume_dir is not None)
    except Preempted as stop:
        exit_preempted(world.rank, f"preempted ({stop}); exiting with "
                       f"{preemption.EXIT_PREEMPTED} for requeue")
