"""Stop on SIGUSR1/SIGTERM (Slurm's warning before a time limit or preemption).

The handler only sets a flag; the training loop polls it after every batch, writes a resumable
checkpoint and exits with :data:`EXIT_PREEMPTED`. The batch script then requeues the job, and
``ddmpi train --resume`` continues where every rank stopped.
"""

import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later

_requested = {"signal": None}


def install(signals=(signal.SIGUSR1, signal.SIGTERM)):
    """Install the flag-setting handler for ``signals``."""
    def handler(signum, _frame):
        _requested["signal"] = signum

    for sig in signals:
        signal.signal(sig, handler)


def requested():
    """The signal number received, or None."""
    return _requested["signal"]
