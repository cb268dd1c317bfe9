#!/usr/bin/env bash
# Submit the whole pipeline as three chained jobs: prepare -> train -> infer + evaluate, each starting
# only if the previous one succeeded (--dependency=afterok; a preempted-and-requeued train job counts
# as succeeded only once its last run finishes). Prints one "<stage> <job id>" line per job.
#
#   VWE_CONFIG=configs/voc.yaml VWE_NODES=2 VWE_SBATCH_ARGS="--gpus-per-node=8 -p gpu -A myproj" \
#   VWE_VOC=/data/VOCdevkit/VOC2012 VWE_SBD=/data/benchmark_RELEASE VWE_SHARDS=/shared/voc_shards \
#       slurm/submit.sh [key=value ...]
#
# Environment:
#   VWE_CONFIG           experiment config (default configs/voc.yaml); overrides on the command line
#                        go to train, infer and evaluate
#   VWE_VOC, VWE_SBD     data for the prepare job; without VWE_VOC there is no prepare job (the
#                        shards named by the config's data.root, e.g. ${VWE_SHARDS}, must exist)
#   VWE_SHARDS           shard folder written by prepare (the shipped configs read it too)
#   VWE_NODES            nodes for train and infer (default 1); VWE_INFER_NODES for infer alone
#   VWE_SBATCH_ARGS      sbatch options for every job (partition, account, time, GPUs, ...)
#   VWE_PREPARE_SBATCH_ARGS, VWE_TRAIN_SBATCH_ARGS, VWE_INFER_SBATCH_ARGS   per job
#   plus what the jobs read: VWE_CPU, VWE_PROCS_PER_NODE, VWE_LAUNCH_CONFIG, VWE_LOG_DIR, VWE_PYTHON
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export VWE_HOME="${VWE_HOME:-$(dirname "$here")}"
export VWE_CONFIG="${VWE_CONFIG:-configs/voc.yaml}"
[ -f "$VWE_CONFIG" ] || { echo "submit.sh: config not found: $VWE_CONFIG" >&2; exit 2; }

# Option lists from the environment, split on whitespace.
read -ra common <<< "--parsable ${VWE_SBATCH_ARGS:-}"
read -ra prepare_args <<< "${VWE_PREPARE_SBATCH_ARGS:-}"
read -ra train_args <<< "${VWE_TRAIN_SBATCH_ARGS:-}"
read -ra infer_args <<< "${VWE_INFER_SBATCH_ARGS:-}"
nodes="${VWE_NODES:-1}"

dep=()
if [ -n "${VWE_VOC:-}" ]; then
    : "${VWE_SHARDS:?set VWE_SHARDS (where prepare writes the shards) together with VWE_VOC}"
    prepare_id="$(sbatch "${common[@]}" "${prepare_args[@]}" "$here/prepare.sbatch")"
    prepare_id="${prepare_id%%;*}"
    echo "prepare $prepare_id"
    dep=(--dependency="afterok:$prepare_id")
fi

train_id="$(sbatch "${common[@]}" -N "$nodes" "${dep[@]}" "${train_args[@]}" \
    "$here/train.sbatch" "$@")"
train_id="${train_id%%;*}"
echo "train $train_id"

infer_id="$(sbatch "${common[@]}" -N "${VWE_INFER_NODES:-$nodes}" --dependency="afterok:$train_id" \
    "${infer_args[@]}" "$here/infer.sbatch" "$@")"
infer_id="${infer_id%%;*}"
echo "infer $infer_id"
