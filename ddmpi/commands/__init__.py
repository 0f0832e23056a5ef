"""The subcommands of :mod:`ddmpi.cli`, one module each, and what they share."""

import logging

from ddmpi.parallel.abort import exit_together
from ddmpi.strategies.rundir import log_to_file
from ddmpi.training.preemption import EXIT_PREEMPTED


def exit_preempted(rank, message):
    """Leave after a preemption (checkpoints written): ``message`` on stdout and in this rank's
    log file, then exit with :data:`EXIT_PREEMPTED` together with the other ranks that stop
    (:func:`~ddmpi.parallel.abort.exit_together`)."""
    print(f"[ddmpi rank {rank}] {message}", flush=True)
    log_to_file(rank, logging.WARNING, message)
    exit_together(EXIT_PREEMPTED)
