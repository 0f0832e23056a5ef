#!/usr/bin/env bash
# tests/run.sh - the project's single test command:  bash tests/run.sh [PYTEST ARGS...]
#
# Runs, from the repository root, each under a time limit:
#   0. the style check:    python -m ruff check ddmpi data_prep   (rules in ruff.toml)
#   1. the serial suite:   python -m pytest -m "not mpi"
#   2. the MPI suite at 2 and 4 ranks:
#                          mpirun -n N [--oversubscribe] python -m pytest --with-mpi -m mpi
# adding --oversubscribe when Open MPI is the launcher and the machine has fewer cores than
# ranks, and OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1 when run as root. Extra arguments go to every
# pytest run (e.g. -x, -k name). An MPI run that collects no test fails (pytest exit 5): the
# MPI suite must never be silently empty. In the MPI parts pytest-timeout uses its "thread"
# method (-o timeout_method=thread): a test hanging past the per-test timeout (setup.cfg) dumps
# every thread's stack and ends its rank, so mpirun stops the whole run instead of the other
# ranks waiting forever in a collective. Output is unbuffered (PYTHONUNBUFFERED=1) so that
# what a killed run printed is not lost. Exits non-zero if any part fails and prints a
# one-line summary at the end.
#
# Environment:
#   PYTHON            interpreter (default: python, e.g. the activated venv's)
#   MPIEXEC           MPI launcher (default: mpirun, else mpiexec)
#   DDMPI_MPI_SIZES   rank counts of the MPI suite (default: "2 4")
#   DDMPI_TEST_PARTS  parts to run: "lint serial mpi" (default), or any of them
#   DDMPI_SERIAL_TIMEOUT / DDMPI_MPI_TIMEOUT   seconds per part (default 1800 / 1200)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

PYTHON=${PYTHON:-python}
MPIEXEC=${MPIEXEC:-$(command -v mpirun || command -v mpiexec || echo mpirun)}
SIZES=${DDMPI_MPI_SIZES:-2 4}
PARTS=${DDMPI_TEST_PARTS:-lint serial mpi}
SERIAL_TIMEOUT=${DDMPI_SERIAL_TIMEOUT:-1800}
MPI_TIMEOUT=${DDMPI_MPI_TIMEOUT:-1200}
# Cores this process may use (GNU nproc would also obey OMP_NUM_THREADS: unset it here).
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null \
        || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "run.sh: $PYTHON not found (activate the venv: . .venv/bin/activate)" >&2
    exit 2
fi

openmpi=0
if "$MPIEXEC" --version 2>&1 | grep -qiE 'open mpi|openrte|prrte|prterun'; then
    openmpi=1
    if [ "$(id -u)" = 0 ]; then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
fi

summary=()
failed=0

record() {   # record NAME RC [NOTE]
    local name=$1 rc=$2 note=${3:-}
    if [ "$rc" = 0 ]; then
        summary+=("$name ok")
    else
        summary+=("$name FAILED (exit $rc${note:+, $note})")
        failed=1
    fi
}

note_for() {  # why a part failed, from its exit code
    case "$1" in
        124|137) echo "timed out" ;;
        5) echo "no tests collected" ;;
        *) echo "" ;;
    esac
}

if [[ " $PARTS " == *" lint "* ]]; then
    echo "=== run.sh: style: $PYTHON -m ruff check ddmpi data_prep"
    "$PYTHON" -m ruff check ddmpi data_prep
    record lint "$?"
fi

if [[ " $PARTS " == *" serial "* ]]; then
    echo "=== run.sh: serial suite: $PYTHON -m pytest -m 'not mpi' $*"
    timeout --kill-after=30 "$SERIAL_TIMEOUT" "$PYTHON" -m pytest -m "not mpi" "$@"
    rc=$?
    record serial "$rc" "$(note_for "$rc")"
fi

if [[ " $PARTS " == *" mpi "* ]]; then
    for n in $SIZES; do
        flags=()
        if [ "$openmpi" = 1 ] && [ "$cores" -lt "$n" ]; then
            flags+=(--oversubscribe)
        fi
        echo "=== run.sh: MPI suite on $n ranks: $MPIEXEC -n $n ${flags[*]-} $PYTHON -m pytest" \
             "--with-mpi -m mpi -o timeout_method=thread $*"
        timeout --kill-after=30 "$MPI_TIMEOUT" \
            "$MPIEXEC" -n "$n" ${flags[@]+"${flags[@]}"} \
            "$PYTHON" -m pytest --with-mpi -m mpi -o timeout_method=thread "$@"
        rc=$?
        record "mpi-$n" "$rc" "$(note_for "$rc")"
    done
fi

status=PASSED
[ "$failed" = 0 ] || status=FAILED
printf '\n=== run.sh: %s: ' "$status"
(IFS=';'; printf '%s' "${summary[*]}" | sed 's/;/; /g')
printf '\n'
exit "$failed"
