"""Abort the whole MPI job when any rank fails, so that no rank is left waiting in a collective.

``python -m mpi4py`` installs such a hook, but console entry points (``ddmpi train``) bypass
it; :func:`run_or_abort` is ddmpi's equivalent, used by every entry point. Ranks that stop on
request (preemption) leave together instead: :func:`exit_together`.
"""

import os
import sys
import time
import traceback

EXIT_FAILURE = 1
MEETING_SECONDS = 60  # how long a stopping rank waits for the others to stop too

_meeting = {}


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def report_and_abort(exc, user_error_types=(), log=None):
    """Print ``exc`` with the rank to stderr (and pass its text to ``log``, a callable, when
    given); abort the job if it has more than one rank."""
    comm = _world()
    prefix = f"[ddmpi rank {comm.Get_rank()}/{comm.Get_size()}]"
    if isinstance(exc, user_error_types):
        text = f"error: {exc}"
    else:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write("".join(f"{prefix} {line}\n" for line in text.splitlines()))
    if log is not None:
        log(text)
    sys.stderr.flush()
    sys.stdout.flush()
    if comm.Get_size() > 1:
        comm.Abort(EXIT_FAILURE)
    raise SystemExit(EXIT_FAILURE)


def prepare_exit_meeting():
    """Collective over all ranks, at start-up: the private communicator on which
    :func:`exit_together` meets (apart from any collective a rank may be waiting in)."""
    _meeting["comm"] = _world().Dup()


def exit_together(code, timeout=MEETING_SECONDS):
    """Exit with ``code`` once every rank has called this (each has written what it must),
    or after ``timeout`` seconds: a rank waiting in a collective for one that stopped never
    calls it, and the launcher ends it when this one exits. Skips MPI's finalisation."""
    comm = _meeting.get("comm")
    if comm is not None and comm.Get_size() > 1:
        request = comm.Ibarrier()
        deadline = time.monotonic() + timeout
        while not request.Test() and time.monotonic() < deadline:
            time.sleep(0.05)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_or_abort(func, *args, user_error_types=(), log=None, **kwargs):
    """Call ``func``; on an exception in this rank end the whole MPI job with a non-zero exit.

    Errors of ``user_error_types`` (bad configuration, bad input file) print one line naming the
    problem; anything else prints its traceback. ``SystemExit`` with a non-zero code also aborts
    under MPI, since the other ranks would otherwise wait for this one forever. ``log``
    (a callable) also receives the message, e.g. for the rank's log file.
    """
    try:
        return func(*args, **kwargs)
    except SystemExit as exc:
        if exc.code not in (None, 0) and _world().Get_size() > 1:
            sys.stderr.flush()
            _world().Abort(exc.code if isinstance(exc.code, int) else EXIT_FAILURE)
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job
        report_and_abort(exc, user_error_types, log)
