"""The subcommands of :mod:`ddmpi.cli`, one module each, and what they share: the exit after a
preemption and the configuration of a resumed run."""

import logging
from pathlib import Path

from ddmpi.cli import RESUME_IF_POSSIBLE
from ddmpi.config import ConfigError, differences, load_config, to_dict
from ddmpi.parallel.abort import exit_together
from ddmpi.strategies.rundir import holds_a_run, log_to_file
from ddmpi.training.preemption import EXIT_PREEMPTED

# Fields a resumed run may change: where and how it runs, not what it computes (data.path:
# the same data set under another path, checked by its identity when the run opens).
RESUMABLE = {"run.dir", "run.device", "run.threads_per_rank", "run.gather_chunk_mb",
             "run.tensorboard", "run.compile", "data.path", "data.in_memory",
             "data.memory_budget_gb"}


def exit_preempted(rank, message):
    """Leave after a preemption (checkpoints written): ``message`` on stdout and in this rank's
    log file, then exit with :data:`EXIT_PREEMPTED` together with the other ranks that stop
    (:func:`~ddmpi.parallel.abort.exit_together`)."""
    print(f"[ddmpi rank {rank}] {message}", flush=True)
    log_to_file(rank, logging.WARNING, message)
    exit_together(EXIT_PREEMPTED)


def resume_dir_of(args, overrides):
    """The directory ``--resume`` names (``--resume`` alone: ``--run-dir``, else the configured
    run.dir); None without ``--resume``."""
    if args.resume == RESUME_IF_POSSIBLE:
        return args.run_dir or load_config(args.config, overrides).run.dir
    return args.resume


def resolve_config(config_path, overrides, resume_dir, holds=holds_a_run, resumable=RESUMABLE,
                   command="train"):
    """The run's configuration: from ``--config``/``--set``, or the one stored in ``resume_dir``.

    On resume, a value that differs from the stored one in a field outside ``resumable`` is an
    error naming the field: what ``resume_dir`` holds belongs to the stored configuration. A
    directory that ``holds`` nothing (for ``train``: no checkpoint) binds nothing.
    """
    if resume_dir is None:
        if config_path is None:
            raise ConfigError(f"ddmpi {command}: give --config FILE (or --resume RUN_DIR)")
        return load_config(config_path, overrides)
    stored = Path(resume_dir) / "config.yaml"
    if config_path is None and not stored.exists():
        raise ConfigError(f"{resume_dir}: no config.yaml to resume from")
    config = load_config(config_path or stored, [f"run.dir={resume_dir}", *overrides])
    if Path(config.run.dir).resolve() != Path(resume_dir).resolve():
        raise ConfigError(f"--resume {resume_dir} and run.dir {config.run.dir} (--run-dir or "
                          f"--set) name different run directories; give the one to resume")
    if holds(resume_dir):
        check_resumable(stored, config, resumable, "--resume keeps the stored configuration")
    return config


def check_resumable(stored, config, resumable, why):
    """A config error naming the first field outside ``resumable`` in which ``config`` differs
    from the configuration stored in the file ``stored``."""
    for key, old, new in differences(to_dict(load_config(stored)), to_dict(config)):
        if key not in resumable:
            raise ConfigError(f"config field '{key}': {new!r} differs from {old!r} stored in "
                              f"{stored}; {why}")
