# Shell functions shared by slurm/launch.sh and the sbatch scripts (sourced, not run).
# shellcheck shell=bash

PREEMPT_EXIT_CODE=75   # vwe.runtime.preempt.PREEMPT_EXIT_CODE: "checkpointed after a preemption signal"

# vwe_spawn CMD...: run CMD in the background; sets VWE_PID. The exit status goes to a file because
# `wait` interrupted by a signal trap can lose it. The wrapper shell outlives a SIGTERM (a trap, not
# "ignore", so CMD itself still gets the default SIGTERM behaviour).
vwe_spawn() {
    VWE_STATUS_FILE="$(mktemp "${TMPDIR:-/tmp}/vwe-status.XXXXXX")"
    (
        trap 'true' TERM
        rc=0
        "$@" || rc=$?
        echo "$rc" > "$VWE_STATUS_FILE"
    ) &
    VWE_PID=$!
}

# vwe_wait: wait (through any number of trap interruptions) until the spawned command has exited;
# sets VWE_RC to its exit status.
vwe_wait() {
    while kill -0 "$VWE_PID" 2>/dev/null; do
        wait "$VWE_PID" 2>/dev/null || true
    done
    VWE_RC="$(cat "$VWE_STATUS_FILE" 2>/dev/null || true)"
    rm -f "$VWE_STATUS_FILE"
    VWE_RC="${VWE_RC:-1}"   # the wrapper itself was killed (SIGKILL)
}

# vwe_descendants PID: every process below PID (from /proc; Linux).
vwe_descendants() {
    local kid
    # shellcheck disable=SC2013  # the file is a space-separated pid list
    for kid in $(cat "/proc/$1/task/"*/children 2>/dev/null); do
        echo "$kid"
        vwe_descendants "$kid"
    done
}

VWE_SIGNAL=""        # first signal the batch script received (USR1: time limit near / preemption notice)
VWE_TERMINATED=0     # 1 once SIGTERM arrived (scancel, or SLURM preempting: SLURM decides about requeue)

_vwe_on_signal() {
    [ -n "$VWE_SIGNAL" ] || VWE_SIGNAL="$1"
    [ "$1" != TERM ] || VWE_TERMINATED=1
    echo "$(date '+%F %T') batch: got SIG$1; sending SIGUSR1 to the job's steps (checkpoint and stop)"
    # Without --batch/--full, scancel signals every step of the job but not this batch shell.
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
}

# vwe_step SUBCOMMAND [ARGS...]: one task per node of the allocation runs slurm/launch.sh, which starts
# `accelerate launch -m vwe SUBCOMMAND ARGS` there; signals to the batch script are forwarded to it.
# Sets VWE_RC to the step's exit status (the highest over the nodes).
vwe_step() {
    trap '_vwe_on_signal USR1' USR1
    trap '_vwe_on_signal TERM' TERM
    # --wait: once one node's launcher ended, give the others time to finish (a checkpoint in
    # progress, or a rendezvous that can no longer complete) before the step is killed.
    vwe_spawn srun --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 --wait="${VWE_STEP_WAIT:-120}" \
        "$VWE_HOME/slurm/launch.sh" "$@"
    vwe_wait
    echo "$(date '+%F %T') batch: step 'vwe $1' exited with $VWE_RC"
}

# vwe_requeue_or_exit RC: exit with RC, but after a preemption exit (75) that was not caused by
# SIGTERM, requeue this job: the requeued run resumes from the newest checkpoint (train.resume: auto).
vwe_requeue_or_exit() {
    local rc="$1"
    if [ "$rc" -eq "$PREEMPT_EXIT_CODE" ]; then
        if [ "$VWE_TERMINATED" = 1 ]; then
            echo "batch: stopped by SIGTERM (scancel, or SLURM preemption, which requeues by itself): not requeueing"
        else
            echo "batch: preempted (exit $rc): requeueing job $SLURM_JOB_ID (restarts so far: ${SLURM_RESTART_COUNT:-0})"
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        fi
    fi
    exit "$rc"
}
