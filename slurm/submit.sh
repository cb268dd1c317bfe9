#!/usr/bin/env bash
# Submit the pipeline as chained jobs: prepare -> train -> infer + evaluate, and with VWE_UNTIL the later
# stages (refine or the IRNet stage -> DeepLab -> its val mIoU), each starting only if the previous one
# succeeded (--dependency=afterok; a preempted-and-requeued job counts as succeeded only once its last
# run finishes). Prints one "<stage> <job id>" line per job.
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
#   VWE_UNTIL            last stage: evaluate (default), refine, irn (relation labels -> relation network
#                        -> random walk), segment (+ DeepLab on seg.labels' pseudo labels -> segment-eval)
#   VWE_NODES            nodes for every job but prepare (default 1); VWE_INFER_NODES for infer alone
#   VWE_SBATCH_ARGS      sbatch options for every job (partition, account, time, GPUs, ...)
#   VWE_PREPARE_SBATCH_ARGS, VWE_TRAIN_SBATCH_ARGS, VWE_INFER_SBATCH_ARGS, VWE_STAGE_SBATCH_ARGS   per job
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
read -ra stage_args <<< "${VWE_STAGE_SBATCH_ARGS:-}"
until="${VWE_UNTIL:-evaluate}"
case "$until" in evaluate|refine|irn|segment) ;; *) echo "submit.sh: VWE_UNTIL must be evaluate, refine, irn or segment" >&2; exit 2 ;; esac
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

# The later stages, one job each on the same nodes (slurm/stage.sbatch). Which pseudo labels DeepLab
# trains on is the config's seg.labels (crf: refine's; irn: the random walk's).
[ "$until" != evaluate ] || exit 0
# The IRNet stage reads the CAMs of irn.label_split: unless they are the ones just made (data.infer_split)
# or irn.cam_dir names them, an infer job for that split comes first (as `vwe pipeline` does).
settings="$("${VWE_PYTHON:-python3}" -c 'import sys; from vwe.formats.config import load_config
c = load_config(sys.argv[1], sys.argv[2:])
extra = c.irn.label_split if c.irn.label_split != c.data.infer_split and not c.irn.cam_dir else "-"
print(c.seg.labels, extra)' "$VWE_CONFIG" "$@")"
read -r labels irn_split <<< "$settings"
stages=(refine)
if [ "$until" = irn ] || { [ "$until" = segment ] && [ "$labels" = irn ]; }; then
    stages=(irn-labels irn-train random-walk)
    [ "$irn_split" = - ] || stages=(infer irn-labels irn-train random-walk)
fi
[ "$until" != segment ] || stages+=(segment segment-eval)
previous="$infer_id"
for stage in "${stages[@]}"; do
    extra=()
    name="$stage"
    if [ "$stage" = infer ]; then
        extra=("data.infer_split=$irn_split")
        name="infer-$irn_split"
    fi
    id="$(sbatch "${common[@]}" -N "$nodes" --dependency="afterok:$previous" --job-name="vwe-$name" \
        "${stage_args[@]}" "$here/stage.sbatch" "$stage" "$@" "${extra[@]}")"
    id="${id%%;*}"
    echo "$name $id"
    previous="$id"
done
