#!/usr/bin/env bash
# Per-node launcher: `srun --ntasks-per-node=1 slurm/launch.sh SUBCOMMAND [ARGS...]` runs
# `accelerate launch ... -m vwe SUBCOMMAND ARGS` once on every node of the allocation, each with its own
# machine rank ($SLURM_NODEID, read here, i.e. on that node), a c10d rendezvous on the head node and a
# port derived from the job id. Also usable outside SLURM (one node) and inside the container.
#
# Environment (all optional):
#   VWE_CPU=1             CPU run: launch/cpu.yaml, gloo
#   VWE_PROCS_PER_NODE    processes per node (alias VWE_GPUS_PER_NODE); default: GPUs on the node,
#                         or 1 on CPU
#   VWE_LAUNCH_CONFIG     accelerate config file; default launch/cpu.yaml (VWE_CPU=1) or
#                         launch/multi_node.yaml; e.g. launch/deepspeed_zero2.yaml
#   VWE_MASTER_ADDR/VWE_PORT  rendezvous address/port; default: the head node's NodeAddr and
#                         20000 + job id mod 20000
#   VWE_LOG_DIR           per-rank logs: $VWE_LOG_DIR/<job id>/run<restart count>/node<node id>/
#                         <torchrun run>/attempt_0/<local rank>/{stdout,stderr}.log
#                         (default: $VWE_RUN_DIR/logs, or runs/logs; never inside the installation)
#   VWE_PYTHON            the Python that has vwe installed (default: python3)
#   VWE_ACCELERATE_ARGS   extra `accelerate launch` flags (word-split)
#
# Preemption: SIGUSR1/SIGTERM reach the training processes (directly from slurmstepd, and forwarded
# here); they checkpoint and exit 75. The accelerate/torchrun agent starts with SIGUSR1 ignored so it
# outlives the workers' checkpoint, and since torchrun reports any non-zero worker exit as 1, this
# script exits 75 when it saw a preemption signal and the launch did not succeed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$here/lib.sh"
home="${VWE_HOME:-$(dirname "$here")}"
python="${VWE_PYTHON:-python3}"

if [ "$#" -lt 1 ]; then
    echo "usage: launch.sh SUBCOMMAND [ARGS...]   (runs accelerate launch -m vwe SUBCOMMAND ARGS)" >&2
    exit 2
fi

nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
node_rank="${SLURM_NODEID:-0}"
job_id="${SLURM_JOB_ID:-local}"

procs="${VWE_PROCS_PER_NODE:-${VWE_GPUS_PER_NODE:-}}"
if [ -z "$procs" ]; then
    if [ "${VWE_CPU:-0}" = 1 ]; then
        procs=1
    elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        procs="$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        procs="$(nvidia-smi -L | grep -c '^GPU' || true)"
    fi
    [ -n "$procs" ] && [ "$procs" -gt 0 ] || procs=1
fi

if [ "${VWE_CPU:-0}" = 1 ]; then
    config="${VWE_LAUNCH_CONFIG:-$home/launch/cpu.yaml}"
    export ACCELERATE_USE_CPU=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    config="${VWE_LAUNCH_CONFIG:-$home/launch/multi_node.yaml}"
fi
[ -f "$config" ] || { echo "launch.sh: accelerate config not found: $config" >&2; exit 2; }

if [ -n "${VWE_MASTER_ADDR:-}" ]; then
    head_addr="$VWE_MASTER_ADDR"
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    # NodeAddr is how SLURM itself reaches the node (defaults to its name).
    head_addr="$(scontrol -o show node "$head" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)"
    head_addr="${head_addr:-$head}"
else
    head_addr=127.0.0.1
fi
if [ -n "${VWE_PORT:-}" ]; then
    port="$VWE_PORT"
elif [[ "$job_id" =~ ^[0-9]+$ ]]; then
    port=$((20000 + job_id % 20000))
else
    port=29500
fi

# The head node (machine rank 0) hosts the rendezvous store; said explicitly because torch's guess
# ("is the endpoint one of my addresses?") is wrong when nodes share a host or sit behind aliases.
is_host=0
[ "$node_rank" != 0 ] || is_host=1

log_dir="${VWE_LOG_DIR:-${VWE_RUN_DIR:-runs}/logs}/$job_id/run${SLURM_RESTART_COUNT:-0}/node$node_rank"
mkdir -p "$log_dir"

# shellcheck disable=SC2206  # VWE_ACCELERATE_ARGS is a flag list, split on purpose
extra=(${VWE_ACCELERATE_ARGS:-})
cmd=("$python" -m accelerate.commands.launch
     --config_file "$config"
     --num_machines "$nnodes" --machine_rank "$node_rank"
     --num_processes $((nnodes * procs))
     --main_process_ip "$head_addr" --main_process_port "$port"
     --rdzv_backend c10d --rdzv_conf "is_host=$is_host" --max_restarts 0
     --log_dir "$log_dir" --tee 3
     "${extra[@]}"
     -m vwe "$@")

echo "launch.sh: node $node_rank/$nnodes ($(hostname)) procs $procs head $head_addr:$port config $config" \
     "logs $log_dir: vwe $*"

preempted=""
# shellcheck disable=SC2317  # called from traps
forward() {
    [ -n "$preempted" ] || preempted="$1"
    echo "launch.sh: node $node_rank got SIG$1: asking the vwe processes to checkpoint and stop"
    # slurmstepd usually signals every process of the step itself; torchrun starts its workers in new
    # sessions, so with proctrack/pgid only this forwarding reaches them. A second USR1 is harmless.
    local pids
    pids="$(vwe_descendants "$VWE_PID")"
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -USR1 $pids 2>/dev/null || true
}

trap '' USR1                 # inherited by the agent (and its workers until they install handlers)
vwe_spawn "${cmd[@]}"
trap 'forward USR1' USR1
trap 'forward TERM' TERM
vwe_wait
rc="$VWE_RC"

if [ -n "$preempted" ] && [ "$rc" -ne 0 ]; then
    echo "launch.sh: node $node_rank: stopped after SIG$preempted (launcher exit $rc): exit $PREEMPT_EXIT_CODE"
    exit "$PREEMPT_EXIT_CODE"
fi
exit "$rc"
