# shellcheck shell=bash
# =============================================================================================
# slurm/lib/requeue.sh - requeue-on-time-limit support, sourced by the ddmpi sbatch scripts.
# Not a job script: do not submit it. Needs bash >= 4.2.
#
# How it works (with "#SBATCH --signal=B:USR1@300" and "#SBATCH --requeue" in the job script):
#
#   1. About 300 s before the time limit Slurm sends SIGUSR1 to the batch shell only ("B:").
#      (Slurm checks every ~60 s, so the signal may come up to a minute earlier.)
#   2. ddmpi_run_step runs the job step (srun ...) in the background and waits for it, so the
#      shell's USR1 trap runs at once; the trap forwards USR1 to srun (kill -USR1 <srun pid>)
#      and srun forwards it to every task of the step.
#   3. Each ddmpi rank finishes its current batch, writes its checkpoint atomically and exits
#      with 75 (EX_TEMPFAIL). The shell keeps waiting until srun has exited.
#   4. If USR1 came and the step did not finish successfully (exit != 0), the shell runs
#      "scontrol requeue $SLURM_JOB_ID": the job goes back to the queue with the same job id,
#      so the same RUN_DIR is used and "ddmpi train --resume" (or "ddmpi compare --resume")
#      continues from the checkpoints.
#      If the step exited 0 (training finished within the warning window), nothing is requeued.
#
# SIGTERM (scancel, time limit reached, preemption) is delivered by Slurm to the step's tasks
# directly; the shell only logs it, waits for the step and does not requeue (a cancelled job
# must stay cancelled; with PreemptMode=REQUEUE Slurm requeues preempted jobs by itself).
#
# Variables:
#   DDMPI_MAX_REQUEUES   stop requeueing after this many restarts (SLURM_RESTART_COUNT), 20
#
# Functions:
#   ddmpi_log MESSAGE...        timestamped line on stdout (the job's .out file)
#   ddmpi_run_step CMD [ARG...] run CMD with the forwarding/requeue logic; returns its exit
#                               code, or 0 after a successful requeue
# =============================================================================================

DDMPI_EXIT_PREEMPTED=75           # EX_TEMPFAIL: checkpoint written, run again to continue

ddmpi_log() {
    printf '[%s] ddmpi-batch: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*"
}

_ddmpi_step_pid=""
_ddmpi_got_usr1=0
_ddmpi_got_term=0
_ddmpi_interrupted=0

_ddmpi_on_usr1() {
    _ddmpi_got_usr1=1
    _ddmpi_interrupted=1
    if [ -n "$_ddmpi_step_pid" ]; then
        ddmpi_log "SIGUSR1 received (time limit near): forwarding to the job step (pid $_ddmpi_step_pid)"
        kill -USR1 "$_ddmpi_step_pid" 2>/dev/null \
            || ddmpi_log "could not signal pid $_ddmpi_step_pid (step already gone?)"
    else
        ddmpi_log "SIGUSR1 received before the step started: forwarding it once the step runs"
    fi
}

_ddmpi_on_term() {
    _ddmpi_got_term=1
    _ddmpi_interrupted=1
    ddmpi_log "SIGTERM received (cancel, time limit or preemption): Slurm signals the step" \
              "itself; waiting for it to checkpoint and exit"
}

ddmpi_run_step() {
    if [ "$#" -eq 0 ]; then
        ddmpi_log "ddmpi_run_step: no command given"
        return 2
    fi
    trap _ddmpi_on_usr1 USR1
    trap _ddmpi_on_term TERM

    "$@" &
    _ddmpi_step_pid=$!
    if [ "$_ddmpi_got_usr1" = 1 ]; then        # the signal beat the launch
        kill -USR1 "$_ddmpi_step_pid" 2>/dev/null || true
    fi

    # A trapped signal makes "wait" return early (status > 128) after running the trap;
    # wait again until the step itself has exited.
    local rc
    while :; do
        _ddmpi_interrupted=0
        rc=0
        wait "$_ddmpi_step_pid" || rc=$?
        if [ "$_ddmpi_interrupted" = 1 ] && [ "$rc" -gt 128 ]; then
            continue
        fi
        break
    done
    trap - USR1 TERM
    ddmpi_log "job step exited with status $rc"

    if [ "$_ddmpi_got_usr1" != 1 ]; then
        if [ "$rc" = "$DDMPI_EXIT_PREEMPTED" ]; then
            ddmpi_log "the step checkpointed and stopped (exit $rc) without a USR1 from this" \
                      "script: not requeueing; submit the same script again to continue"
        fi
        return "$rc"
    fi
    if [ "$rc" = 0 ]; then
        ddmpi_log "the run finished before the time limit: nothing to requeue"
        return 0
    fi
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        ddmpi_log "SLURM_JOB_ID is not set (not under Slurm?): cannot requeue"
        return "$rc"
    fi
    local restarts=${SLURM_RESTART_COUNT:-0} max=${DDMPI_MAX_REQUEUES:-20}
    if [ "$restarts" -ge "$max" ]; then
        ddmpi_log "already restarted $restarts times (DDMPI_MAX_REQUEUES=$max): not requeueing"
        return "$rc"
    fi
    if [ "$rc" != "$DDMPI_EXIT_PREEMPTED" ]; then
        ddmpi_log "warning: expected exit $DDMPI_EXIT_PREEMPTED after USR1, got $rc; requeueing" \
                  "anyway (--resume continues from the last complete checkpoints)"
    fi
    ddmpi_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    if scontrol requeue "$SLURM_JOB_ID"; then
        return 0
    fi
    ddmpi_log "scontrol requeue $SLURM_JOB_ID failed (job submitted without --requeue, or" \
              "requeueing disabled on this cluster?): resubmit the same script to continue"
    return "$rc"
}
