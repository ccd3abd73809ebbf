#!/usr/bin/env bash
# One GPU check in one run: install the given wheels, build TensorRT engines for `small`
# and `trace-7b`, check parity with PyTorch, time, and write
# benchmarks/results/gpu-<gpu>-<date>.{json,md}. See benchmarks/README.md.
#
#   benchmarks/gpu/check.sh --wheels DIR [--work DIR] [--results DIR] [--budget-min 28]
#                           [--skip-7b] [--venv DIR (default WORK/venv)]
#
# GPU hosts have PyTorch, ONNX, onnxruntime and CUDA but no internet: everything else
# (tensorrt, cuda-python, onnxruntime-gpu, and any of av/sentencepiece/rich/safetensors/
# mistral-common the host lacks) must be wheel files in --wheels. Resumable: run it again
# with the same --work to continue after a time limit (finished steps are kept).
set -euo pipefail
cd "$(dirname "$0")/../.."
START=$SECONDS
WHEELS="" WORK="${TMPDIR:-/tmp}/trace-rt-gpu-check" RESULTS="benchmarks/results"
BUDGET=28 SKIP7B="" VENV=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --results) RESULTS=$2; shift 2 ;;
    --budget-min) BUDGET=$2; shift 2 ;;
    --skip-7b) SKIP7B="--skip-7b"; shift ;;
    --venv) VENV=$2; shift 2 ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$WHEELS" ] && [ -d "$WHEELS" ] || { echo "check.sh: --wheels DIR is required" >&2; exit 2; }
VENV=${VENV:-$WORK/venv}  # outside the checkout: nothing to ignore or commit by mistake
nvidia-smi -L || { echo "check.sh: no NVIDIA GPU visible" >&2; exit 1; }

# A venv that sees the host's CUDA build of torch (and onnx, onnxruntime); the wheels
# install on top (onnxruntime-gpu then shadows a CPU onnxruntime). No index: offline.
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
fi
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "check.sh: no .whl files in $WHEELS" >&2; exit 2; }
timeout 600 "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" "${wheels[@]}"
# The repository runs from its checkout (no build backend needed offline).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Preflight: name every missing module now rather than fail ten minutes in.
"$VENV/bin/python" - <<'EOF'
import importlib, sys
need = ["numpy", "torch", "onnx", "onnxruntime", "tensorrt", "av", "sentencepiece", "rich",
        "safetensors", "mistral_common", "pytest"]
missing = []
for m in need:
    try:
        importlib.import_module(m)
    except Exception as e:
        missing.append(f"{m} ({e})")
try:
    from cuda.bindings import runtime  # noqa: F401
except ImportError:
    try:
        from cuda import cudart  # noqa: F401
    except ImportError as e:
        missing.append(f"cuda-python ({e})")
try:
    import numpy, torch
    if int(numpy.__version__.split(".")[0]) >= 2:
        missing.append(f"numpy<2 (have {numpy.__version__})")
    if not torch.cuda.is_available():
        missing.append("a CUDA build of torch that sees the GPU")
except ImportError:
    pass  # already listed
if missing:
    sys.exit("check.sh: missing, add wheels for: " + "; ".join(missing))
print("preflight ok: torch", torch.__version__, "tensorrt", importlib.import_module("tensorrt").__version__)
EOF

LEFT_MIN=$(awk "BEGIN {print $BUDGET - ($SECONDS - $START) / 60}")
echo "setup took $(( SECONDS - START )) s; $LEFT_MIN min left for the check"
"$VENV/bin/python" benchmarks/gpu/check.py run --work "$WORK" --results "$RESULTS" \
  --budget-min "$LEFT_MIN" $SKIP7B
