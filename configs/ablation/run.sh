#!/usr/bin/env bash
# The ablation of docs/ablation.md: synthetic data, the four configs of this folder, 3 seeds each,
# one process per run; then the table (CAM mIoU mean and spread per variant).
# Usage: bash configs/ablation/run.sh [WORKDIR]   (default runs/ablation; needs `vwe` on PATH)
set -euo pipefail
work=${1:-runs/ablation}
here=$(cd "$(dirname "$0")" && pwd)
seeds=${SEEDS:-"0 1 2"}
[ -f "$work/synthetic/DONE" ] || { vwe synth --out "$work/synthetic" --train 320 --val 160 --seed 0 --size 128 \
                                    && touch "$work/synthetic/DONE"; }
vwe prepare --voc "$work/synthetic" --out "$work/shards" --shard-size 64
for seed in $seeds; do
  for variant in cam hspp vwe hspp_vwe; do
    run="$work/runs/${variant}_s${seed}"
    [ -f "$run/eval/report.json" ] && continue
    start=$(date +%s)
    vwe pipeline --config "$here/$variant.yaml" "data.root=$work/shards" "output.run_dir=$run" \
        "train.seed=$seed" > "$work/${variant}_s${seed}.log" 2>&1
    echo "$variant seed $seed: $(( $(date +%s) - start )) s"
  done
done
python - "$work" $seeds <<'PY'
import json, statistics, sys
from pathlib import Path
work, seeds = Path(sys.argv[1]), sys.argv[2:]
print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread (max - min) | std |")
print("|---|" + "---|" * (len(seeds) + 3))
for v in ("cam", "hspp", "vwe", "hspp_vwe"):
    m = [100 * json.loads((work / "runs" / f"{v}_s{s}" / "eval" / "report.json").read_text())["miou"] for s in seeds]
    std = statistics.stdev(m) if len(m) > 1 else 0.0
    print(f"| {v} | " + " | ".join(f"{x:.1f}" for x in m) + f" | {statistics.mean(m):.1f} | {max(m) - min(m):.1f} | {std:.1f} |")
PY
