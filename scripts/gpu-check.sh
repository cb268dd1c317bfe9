#!/usr/bin/env bash
# The checks to run wherever a GPU is lent: the `gpu`-marked tests, then the benchmark suite at the sizes
# of configs/voc.yaml, whose table replaces the "Suite: GPU" section of docs/benchmarks.md.
#   scripts/gpu-check.sh [OUT_DIR]      (default runs/gpu-check; env: PYTHON, STEPS, SUITE_ARGS, DOC, *_TIMEOUT)
# Both run even if the first fails; the exit status is the first failure's.
set -uo pipefail
out=${1:-runs/gpu-check}
python=${PYTHON:-python3}
mkdir -p "$out"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1 || true
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])' >>"$out/gpu.txt" 2>&1

echo "== pytest -m gpu" >&2
timeout "${TEST_TIMEOUT:-300}" "$python" -m pytest -m gpu -ra -p no:cacheprovider --durations=0 tests/test_gpu.py \
    2>&1 | tee "$out/gpu-tests.log" || status=$?

echo "== vwe bench suite" >&2
# shellcheck disable=SC2086  # SUITE_ARGS is a list of config overrides
timeout "${SUITE_TIMEOUT:-420}" "$python" -m vwe bench suite --config configs/voc.yaml model.pretrained=none \
    ${SUITE_ARGS:-} --steps "${STEPS:-10}" --out "$out/suite" --update-doc "${DOC:-docs/benchmarks.md}" \
    2>&1 | tee "$out/suite.log" || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
exit "$status"
