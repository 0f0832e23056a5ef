"""Stop on SIGUSR1/SIGTERM (Slurm's warning before a time limit or preemption).

The handler only sets a flag; the training loop polls it after every batch, writes a resumable
checkpoint and exits with :data:`EXIT_PREEMPTED`. The batch script then requeues the job, and
``ddmpi train --resume`` (or ``ddmpi compare --resume``) continues where every rank stopped.

The CLI installs the handler before its heavy imports, so that a signal during start-up stops
the run at its first batch instead of killing the rank; a rank whose work is done ignores the
signals (:func:`ignore`) while it waits for the others in MPI's finalisation.
"""

import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_requested = {"signal": None}


def install(signals=SIGNALS):
    """Install the flag-setting handler for ``signals``."""
    def handler(signum, _frame):
        _requested["signal"] = signum

    for sig in signals:
        signal.signal(sig, handler)


def ignore(signals=SIGNALS):
    """Ignore ``signals`` from now on (this rank's work is done).

    Python's finalisation resets signals with a Python handler to their default action, which
    kills the process, before mpi4py finalises MPI; that waits for every other rank (rank 0 may
    still train the coarse model). An ignored signal stays ignored through both.
    """
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def requested():
    """The signal number received, or None."""
    return _requested["signal"]


def describe():
    """The signal received, in words for messages and ``segments.json``: its name, and for
    SIGTERM who may have sent it."""
    number = _requested["signal"]
    if number is None:
        return "a stop on another rank"
    name = signal.Signals(number).name
    if number == signal.SIGTERM:
        return (f"{name} (a time limit, preemption or cancellation, or the launcher ending the "
                f"job after another rank failed: see the other ranks' messages)")
    return name
