"""Abort the whole MPI job when any rank fails, so that no rank is left waiting in a collective.

``python -m mpi4py`` installs such a hook, but console entry points (``ddmpi train``) bypass
it; :func:`run_or_abort` is ddmpi's equivalent, used by every entry point.
"""

import sys
import traceback

EXIT_FAILURE = 1


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def report_and_abort(exc, user_error_types=()):
    """Print ``exc`` with the rank to stderr; abort the job if it has more than one rank."""
    comm = _world()
    prefix = f"[ddmpi rank {comm.Get_rank()}/{comm.Get_size()}]"
    if isinstance(exc, user_error_types):
        sys.stderr.write(f"{prefix} error: {exc}\n")
    else:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        sys.stderr.write("".join(f"{prefix} {line}\n" for line in text.splitlines()))
    sys.stderr.flush()
    sys.stdout.flush()
    if comm.Get_size() > 1:
        comm.Abort(EXIT_FAILURE)
    raise SystemExit(EXIT_FAILURE)


def run_or_abort(func, *args, user_error_types=(), **kwargs):
    """Call ``func``; on an exception in this rank end the whole MPI job with a non-zero exit.

    Errors of ``user_error_types`` (bad configuration, bad input file) print one line naming the
    problem; anything else prints its traceback. ``SystemExit`` with a non-zero code also aborts
    under MPI, since the other ranks would otherwise wait for this one forever.
    """
    try:
        return func(*args, **kwargs)
    except SystemExit as exc:
        if exc.code not in (None, 0) and _world().Get_size() > 1:
            sys.stderr.flush()
            _world().Abort(exc.code if isinstance(exc.code, int) else EXIT_FAILURE)
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job
        report_and_abort(exc, user_error_types)
