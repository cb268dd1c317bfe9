# Shell functions shared by slurm/launch.sh and the sbatch scripts (sourced, not run).
# shellcheck shell=bash

PREEMPT_EXIT_CODE=75   # vwe.preempt.PREEMPT_EXIT_CODE: "checkpointed after a preemption signal"
VWE_GOT_SIGNAL=0       # set to 1 by signal traps, so vwe_wait knows why `wait` returned

# vwe_wait PID: wait for a background child until it has really exited, also when traps interrupt
# `wait` (it then returns 128+signal early); sets VWE_RC to the child's exit status.
vwe_wait() {
    local pid="$1" rc prev=""
    while :; do
        VWE_GOT_SIGNAL=0
        wait "$pid" && rc=0 || rc=$?
        if [ "$rc" -eq 127 ] && [ -n "$prev" ]; then rc="$prev"; break; fi   # already reaped
        if [ "$VWE_GOT_SIGNAL" = 1 ] && [ "$rc" -gt 128 ]; then prev="$rc"; continue; fi
        break
    done
    VWE_RC="$rc"
}

VWE_SIGNAL=""        # first signal the batch script received (USR1: time limit near / preemption notice)
VWE_TERMINATED=0     # 1 once SIGTERM arrived (scancel, or SLURM preempting: SLURM decides about requeue)
VWE_STEP_PID=""

_vwe_on_signal() {
    VWE_GOT_SIGNAL=1
    [ -n "$VWE_SIGNAL" ] || VWE_SIGNAL="$1"
    [ "$1" != TERM ] || VWE_TERMINATED=1
    echo "$(date '+%F %T') batch: got SIG$1; forwarding SIGUSR1 to the running step (checkpoint and stop)"
    if [ -n "$VWE_STEP_PID" ]; then kill -USR1 "$VWE_STEP_PID" 2>/dev/null || true; fi
}

# vwe_step SUBCOMMAND [ARGS...]: one task per node of the allocation runs slurm/launch.sh, which starts
# `accelerate launch -m vwe SUBCOMMAND ARGS` there; signals to the batch script are forwarded to it.
# Sets VWE_RC to the step's exit status (the highest over the nodes).
vwe_step() {
    trap '_vwe_on_signal USR1' USR1
    trap '_vwe_on_signal TERM' TERM
    # --wait: once one node's launcher ended, give the others time to finish (a checkpoint in
    # progress, or a rendezvous that can no longer complete) before the step is killed.
    srun --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 --wait="${VWE_STEP_WAIT:-120}" \
        "$VWE_HOME/slurm/launch.sh" "$@" &
    VWE_STEP_PID=$!
    vwe_wait "$VWE_STEP_PID"
    VWE_STEP_PID=""
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
