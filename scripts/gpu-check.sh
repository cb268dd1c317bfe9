#!/usr/bin/env bash
# The checks to run wherever a GPU is lent: the `gpu`-marked tests; the benchmark suite at the sizes of
# configs/voc.yaml (components, and the real commands beside them), whose table replaces the "Suite: GPU"
# section of docs/benchmarks.md; and a whole `vwe pipeline --until segment` on the suite's synthetic data,
# with the seconds of each stage. Random weights and lr 0 throughout: timing, not accuracy.
#   scripts/gpu-check.sh [OUT_DIR]   (default $OUT, else runs/gpu-check)
# env: PYTHON; STEPS (suite), PIPELINE_STEPS; SUITE_ARGS (extra overrides); DOC; TEST_TIMEOUT, SUITE_TIMEOUT,
#      PIPELINE_TIMEOUT, SEG_TIMEOUT; SKIP="tests suite seg pipeline" (any of them, to run the parts in
#      separate calls; seg: `vwe bench seg` accumulated with train.cudnn_benchmark false, then true, then with
#      seg.fuse_micro_batches, then also seg.compile; and `vwe bench train --compare cudnn_benchmark`);
#      EVAL_IMAGES=1464: also `vwe bench eval` on that many made-up VOC-sized CAMs (made first: images in
#      parallel by `vwe synth`, then shards and CAMs);
#      INFER_IMAGES=1464: also the device's cost of new image sizes (`vwe bench infer --compare sizes`,
#      SIZES_IMAGES sizes, default 16), the real `vwe infer` (scales made on the device at the default group
#      window, then at WINDOW, default 256, then without cuDNN, then made by the loader) and `vwe evaluate`
#      on that many VOC-sized images, timed, with the infer pass's split of its time (waiting for samples / computing
#      and images per call / waiting for writes); each stops at INFER_TIMEOUT (100 s), its rate then
#      counted from the CAM files written;
#      WHEELS=DIR: first install DIR/*.whl, and build DIR/*.tar.gz with the build tools in DIR/build (wheels),
#      into a temporary folder put on PYTHONPATH (a device image without webdataset, braceexpand, pydensecrf2);
#      PACK=FILE.tgz: also pack the figures and logs into that one archive;
#      TINY=1: CPU-sized (configs/demo.yaml shrunk, no doc update), to check the script itself anywhere.
# Every part runs even if an earlier one fails; the exit status is the first failure's.
set -uo pipefail
out=${1:-${OUT:-runs/gpu-check}}
python=${PYTHON:-python3}
skip=" ${SKIP:-} "
mkdir -p "$out"
status=0
fail() { [ "$status" -ne 0 ] || status=$1; }

if [ "${TINY:-0}" = 1 ]; then
    config=configs/demo.yaml
    sizes=(model.backbone=resnet18 model.num_words=8 data.crop_size=64 "data.long_side=[64, 80]" train.batch_size=2
           "infer.scales=[1.0]" infer.batch_size=2 data.num_workers=1 seg.crop_size=64 seg.batch_size=2
           seg.grad_accum=2 seg.norm=group "seg.test_scales=[0.5]" seg.test_flip=false)
    synth=(--train 24 --val 6 --size 80)
    steps=${STEPS:-1} pipeline_steps=${PIPELINE_STEPS:-3} doc=() quick=(--quick)
else
    config=configs/voc.yaml
    sizes=(model.pretrained=none seg.pretrained=none)
    synth=(--train 64 --val 16 --size 500)
    steps=${STEPS:-10} pipeline_steps=${PIPELINE_STEPS:-30} doc=(--update-doc "${DOC:-docs/benchmarks.md}") quick=()
fi

if [ -n "${WHEELS:-}" ]; then  # packages the device's image lacks: wheels, and source archives built there
    # (pydensecrf2 has no wheel for every Python) with the build tools carried as wheels in $WHEELS/build
    site=$(mktemp -d)
    for sdist in "$WHEELS"/*.tar.gz; do
        [ -e "$sdist" ] || continue
        # a failed build (no compiler or Python headers there) leaves only the CRF out: the pipeline part fails
        "$python" -m pip wheel -q --no-index --find-links "$WHEELS/build" --no-deps -w "$site/built" "$sdist" \
            >>"$out/wheels.log" 2>&1 || { tail -5 "$out/wheels.log" >&2; echo "warning: $sdist not built" >&2; }
    done
    wheels=("$WHEELS"/*.whl "$site"/built/*.whl)
    for w in "${!wheels[@]}"; do [ -e "${wheels[$w]}" ] || unset "wheels[$w]"; done  # an empty folder's pattern
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" \
        >>"$out/wheels.log" 2>&1 || { cat "$out/wheels.log" >&2; exit 2; }
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1 || true
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
import webdataset, pydensecrf.densecrf as crf; print("webdataset", webdataset.__file__, "pydensecrf", crf.__file__)' \
    >>"$out/gpu.txt" 2>&1
lscpu >"$out/cpu.txt" 2>&1 || true

if [[ $skip != *" tests "* ]]; then
    echo "== pytest -m gpu" >&2
    timeout "${TEST_TIMEOUT:-300}" "$python" -m pytest -m gpu -ra -p no:cacheprovider --durations=0 tests/test_gpu.py \
        2>&1 | tee "$out/gpu-tests.log" || fail $?
fi

shards=$out/suite/shards
make_data() {  # a synthetic set of the suite's kind, for TINY runs and a pipeline without the suite
    "$python" -m vwe synth --out "$out/suite/synthetic" "${synth[@]}" >"$out/data.log" 2>&1 &&
        "$python" -m vwe prepare --voc "$out/suite/synthetic" --out "$shards" --shard-size 16 >>"$out/data.log" 2>&1
}
[ "${TINY:-0}" != 1 ] || [ -f "$shards/val.json" ] || make_data || fail $?

if [[ $skip != *" suite "* ]]; then
    echo "== vwe bench suite" >&2
    # shellcheck disable=SC2086  # SUITE_ARGS is a list of config overrides
    # without shards there, the suite makes its synthetic set in that folder
    timeout "${SUITE_TIMEOUT:-540}" "$python" -m vwe bench suite --config "$config" "${sizes[@]}" "data.root=$shards" \
        ${SUITE_ARGS:-} \
        --steps "$steps" "${quick[@]}" --out "$out/suite" "${doc[@]}" 2>&1 | tee "$out/suite.log" || fail $?
fi

if [[ $skip != *" seg "* ]]; then  # DeepLab's step as the recipe runs it (2 x 5 crops), without and with
    # cuDNN's algorithm search, then fused (one batch of 10), then fused and compiled; and the CAM network's
    # step without and with the search
    echo "== vwe bench seg: heuristics, autotuned, fused, fused + compiled; vwe bench train" >&2
    for variant in "heuristics train.cudnn_benchmark=false" "autotuned" "fused seg.fuse_micro_batches=true" \
                   "fused-compiled seg.fuse_micro_batches=true seg.compile=true"; do
        read -r name settings <<< "$variant"
        # shellcheck disable=SC2086  # settings: a list of config overrides
        timeout "${SEG_TIMEOUT:-300}" "$python" -m vwe bench seg --config "$config" "${sizes[@]}" $settings \
            --steps "$steps" --json "$out/seg-$name.json" 2>&1 | grep -v Warning | tee -a "$out/seg-figures.md" \
            || fail $?
    done
    timeout "${SEG_TIMEOUT:-300}" "$python" -m vwe bench train --config "$config" "${sizes[@]}" \
        --compare cudnn_benchmark --steps "$steps" 2>&1 | grep -v Warning | tee -a "$out/seg-figures.md" || fail $?
fi

if [ -n "${EVAL_IMAGES:-}" ]; then  # the issue's evaluation figure: that many VOC-sized CAMs, all threads and one
    echo "== vwe bench eval ($EVAL_IMAGES images)" >&2
    { "$python" -m vwe synth --out "$out/eval/synthetic" --train "$EVAL_IMAGES" --val 8 --size 500 --seed 1 &&
      "$python" -m vwe prepare --voc "$out/eval/synthetic" --out "$out/eval/shards" &&
      "$python" -m vwe bench eval --config configs/voc.yaml "data.root=$out/eval/shards" data.infer_split=train \
          --json "$out/eval/eval.json"; } >"$out/eval.log" 2>&1 || fail $?
    tail -1 "$out/eval.log" >&2
fi

if [ -n "${INFER_IMAGES:-}" ]; then  # the issue's inference figure: the real `vwe infer` and `vwe evaluate`
    # on that many VOC-sized images at configs/voc.yaml's scales and precision (weights: 1 step at lr 0)
    echo "== vwe infer + vwe evaluate ($INFER_IMAGES images)" >&2
    data=$out/infer
    irun=$data/run
    size=500
    [ "${TINY:-0}" != 1 ] || size=96
    rm -rf "$irun"
    { [ -f "$data/shards/train.json" ] ||
        { "$python" -m vwe synth --out "$data/synthetic" --train "$INFER_IMAGES" --val 4 --size "$size" --seed 2 &&
          "$python" -m vwe prepare --voc "$data/synthetic" --out "$data/shards"; }; } >"$data.log" 2>&1 || fail $?
    common=(--config "$config" "${sizes[@]}" "data.root=$data/shards" data.infer_split=train
            "output.run_dir=$irun" output.tensorboard=false)
    "$python" -m vwe train "${common[@]}" train.max_steps=1 train.lr=0 train.checkpoint_every=0 >>"$data.log" 2>&1 \
        || fail $?
    # the device alone: a repeated image size against sizes met for the first time (what a new shape costs)
    "$python" -m vwe bench infer --config "$config" "${sizes[@]}" --compare sizes --steps "${SIZES_IMAGES:-16}" \
        --json "$out/infer-sizes.json" 2>&1 | tee -a "$out/infer-figures.md" || fail $?
    # infer with the scales made on the device (auto on a GPU), at the default group window, then a
    # wider one (fuller batches), then with the loader making the scales (the same CAMs); then evaluate
    # each run stops at INFER_TIMEOUT (default 100 s): then the CAM files written so far give its rate
    partial=0
    for step in "infer infer.group_window=0" "evaluate" "infer infer.group_window=${WINDOW:-256}" \
                "infer infer.cudnn=false" "infer infer.resize_on=loader"; do
        read -r command setting <<< "$step"
        if [ "$command" = infer ]; then
            rm -rf "$irun/cams"
        elif [ "$partial" = 1 ]; then
            echo "vwe $command: skipped (the first pass stopped at its limit: its CAMs are incomplete)" \
                | tee -a "$out/infer-figures.md"
            continue
        fi
        start=$(date +%s.%N)
        timeout "${INFER_TIMEOUT:-100}" "$python" -m vwe "$command" "${common[@]}" ${setting:+"$setting"} \
            >>"$data.log" 2>&1
        rc=$?
        seconds=$(awk "BEGIN { print $(date +%s.%N) - $start }")
        n=$INFER_IMAGES
        if [ "$rc" = 124 ] && [ "$command" = infer ]; then
            n=$(find "$irun/cams" -name '*.npz' | wc -l)
            [ "$step" != "infer infer.group_window=0" ] || partial=1
            echo "vwe $command ${setting:-}: stopped at the ${INFER_TIMEOUT:-100} s limit" \
                | tee -a "$out/infer-figures.md"
        elif [ "$rc" != 0 ]; then
            fail "$rc"
        fi
        awk -v c="$command ${setting:-}" -v s="$seconds" -v n="$n" \
            'BEGIN { printf "vwe %s: %d images in %.1f s wall (%.1f img/s, start-up included)\n", c, n, s, n / s }' \
            | tee -a "$out/infer-figures.md"
    done
    grep -h -e "rank 0: .* of which" -e "waited .* for the device" "$data.log" | tee -a "$out/infer-figures.md"
fi

if [[ $skip != *" pipeline "* ]]; then
    echo "== vwe pipeline --until segment" >&2
    [ -f "$shards/val.json" ] || make_data || fail $?
    run=$out/pipeline/run
    rm -rf "$run"
    start=$(date +%s.%N)
    # CAMs, CRF labels and predictions of the val split (16 images): the CRF is CPU work, one process here
    timeout "${PIPELINE_TIMEOUT:-300}" "$python" -m vwe pipeline --config "$config" --until segment "${sizes[@]}" \
        "data.root=$shards" data.train_split=train data.infer_split=val "output.run_dir=$run" output.tensorboard=false \
        "train.max_steps=$pipeline_steps" train.checkpoint_every=0 train.lr=0 train.log_every=1 \
        "seg.max_steps=$pipeline_steps" seg.checkpoint_every=0 seg.lr=0 seg.train_split=val_pseudo \
        >"$out/pipeline.log" 2>&1 || { rc=$?; tail -20 "$out/pipeline.log" >&2; fail $rc; }
    wall=$(awk "BEGIN { print $(date +%s.%N) - $start }")
    echo "per-stage seconds of the pipeline (each stage's own timing; the rest is start-up and loading):" \
        | tee "$out/pipeline-stages.md"
    "$python" -m vwe.bench.suite stages "$run" "$wall" | tee -a "$out/pipeline-stages.md" || fail $?
fi
if [ -n "${PACK:-}" ]; then  # the figures and logs (not data, CAMs or weights) as one archive, for a device
    # run whose output folder brings back only a few files
    (cd "$out" && find . -type f \( -name '*.md' -o -name '*.json' -o -name '*.jsonl' -o -name '*.log' \
        -o -name '*.txt' \) -size -4M -not -path '*/shards/*' -not -path '*/synthetic/*' -not -path '*/cams/*' \
        -print0 | tar -czf - --null -T -) >"$PACK" || fail $?
fi
exit "$status"
