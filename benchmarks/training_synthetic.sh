#!/usr/bin/env bash
# The CPU learning proof of benchmarks/results/training-synthetic-tiny-cpu.md, end to end:
# synthetic data -> tiny model from scratch -> ONNX export -> moment retrieval on the
# held-out split through the onnxruntime pipeline. Usage: benchmarks/training_synthetic.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/trace-rt-train-proof}
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 threads on a shared 2-core box spin
mkdir -p "$WORK"
time $PY -m training synth-data "$WORK/data" --videos 800 --seed 0 --max-shapes 1 --tasks mr
time $PY -m training train --config training/recipes/tiny-synthetic.yaml --data "$WORK/data" \
    --out "$WORK/ckpt" --preset tiny --no-progress
time $PY -m export onnx "$WORK/ckpt" "$WORK/art"
time $PY -m training eval "$WORK/art" --data "$WORK/data/val.json" --backend onnxruntime \
    --out "$WORK/eval.json"
time $PY -m training eval "$WORK/art" --data "$WORK/data/val.json" --backend onnxruntime \
    --constrained --out "$WORK/eval-constrained.json"
