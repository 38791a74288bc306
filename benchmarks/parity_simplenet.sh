#!/usr/bin/env bash
# Train SimpleNet on full CIFAR-10 under dfp16 and float32 with identical
# hyper-parameters (the simplenet preset), three seeds each, for docs/results.md.
#
#   bash benchmarks/parity_simplenet.sh [DATA_DIR] [OUT_DIR]
#
# DATA_DIR defaults to ../shared/datasets/cifar10 and OUT_DIR to runs/parity. Each run
# trains EPOCHS epochs of STEPS_PER_EPOCH batches of 64 images (environment variables,
# defaults 3 and 40: 7,680 images, about 15 % of an epoch of CIFAR-10), then evaluates
# on all 10,000 test images. Runs alternate between the policies seed by seed, so an
# interrupted job leaves complete pairs. Rerunning it skips runs whose summary.json
# exists and continues interrupted ones with --resume.
# Summarize with: python tools/parity_report.py OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/datasets/cifar10}
OUT_DIR=${2:-runs/parity}
EPOCHS=${EPOCHS:-3}
STEPS_PER_EPOCH=${STEPS_PER_EPOCH:-40}
PYTHON=${PYTHON:-.venv/bin/python}

for seed in 0 1 2; do
  for policy in float32 dfp16; do
    run_dir="$OUT_DIR/simplenet-$policy-seed$seed"
    if [ -f "$run_dir/summary.json" ]; then
      echo "skip $run_dir: summary.json exists"
      continue
    fi
    echo "$(date -u +%FT%TZ) start $run_dir"
    "$PYTHON" -m model_garden.train --model=simplenet --data="$DATA_DIR" \
      --policy="$policy" --seed="$seed" --epochs="$EPOCHS" \
      --steps_per_epoch="$STEPS_PER_EPOCH" --model_dir="$run_dir" --resume --verbose=2
    echo "$(date -u +%FT%TZ) end $run_dir"
  done
done
