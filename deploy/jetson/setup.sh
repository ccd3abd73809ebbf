#!/usr/bin/env bash
# trace-rt on a Jetson (JetPack 6.1/6.2: L4T r36.4, Ubuntu 22.04, Python 3.10, CUDA 12.6,
# TensorRT 10.3), without torch or transformers:
#
#   sudo bash deploy/jetson/setup.sh            # then: source .venv-edge/bin/activate
#
#   - TensorRT's Python bindings come from JetPack itself (apt: python3-libnvinfer); the
#     tensorrt-cu12 wheels of PyPI do not install on aarch64 JetPack. The venv is created
#     with --system-site-packages so it sees them.
#   - onnxruntime-gpu comes from NVIDIA's Jetson wheel index (JETSON_INDEX; CUDA EP for
#     the onnxruntime backend); PyPI's aarch64 onnxruntime is CPU-only.
#   - cuda-python (device memory, streams, CUDA graphs for the TensorRT backend) and the
#     runtime's own dependencies (numpy<2, PyAV, sentencepiece, rich) from PyPI.
# Then build the engines on this board (they are tied to the GPU and TensorRT version):
#   python -m export trt ARTIFACTS --int4      # or --fp16; ARTIFACTS from `export onnx`
#   (int4 needs `python -m export quantize ARTIFACTS --int4` first, and the one-graph
#   decode step `python -m export step ...`, both on a machine with onnx/torch)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VENV:-$REPO/.venv-edge}
JETSON_INDEX=${JETSON_INDEX:-https://pypi.jetson-ai-lab.dev/jp6/cu126}

if [ "$(uname -m)" != aarch64 ] || [ ! -f /etc/nv_tegra_release ]; then
  echo "setup.sh: this is not a Jetson (aarch64 + /etc/nv_tegra_release); continuing" \
    "for a container build or a dry run" >&2
fi
if [ "$(id -u)" = 0 ]; then
  apt-get update -q
  # python3-libnvinfer: TensorRT's bindings for the system python3 (JetPack's TensorRT).
  apt-get install -y -q --no-install-recommends python3-venv python3-pip python3-libnvinfer
else
  echo "setup.sh: not root, skipping apt (needs python3-venv python3-libnvinfer)" >&2
fi
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "numpy>=1.24,<2" "av>=12" "sentencepiece>=0.2" \
  "rich>=13" "cuda-python>=12.6,<13"
"$VENV/bin/python" -m pip install -q --extra-index-url "$JETSON_INDEX" onnxruntime-gpu \
  || echo "setup.sh: onnxruntime-gpu not installed from $JETSON_INDEX (set JETSON_INDEX);" \
    "the tensorrt backend does not need it" >&2
# The runtime itself, without extras: its dependencies are the ones above.
"$VENV/bin/python" -m pip install -q --no-deps -e "$REPO"

"$VENV/bin/python" - <<'PY'
import sys
import trace_rt
bad = [m for m in ("torch", "transformers") if m in sys.modules]
assert not bad, f"the runtime imported {bad}"
try:
    import tensorrt
    from trace_rt.backends.tensorrt_manifest import check_tensorrt_version
    check_tensorrt_version(tensorrt.__version__)
    trt = f"TensorRT {tensorrt.__version__}"
except ImportError as e:
    trt = f"no TensorRT ({e})"
try:
    import onnxruntime
    ort = f"onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}"
except ImportError:
    ort = "no onnxruntime"
print(f"trace-rt {trace_rt.__version__}: {trt}; {ort}")
PY
echo "ready: source $VENV/bin/activate; trace-rt plan --model ARTIFACTS --device orin-nx-16gb"
# The install maps the trace_rt package only; the export package runs from the checkout.
echo "engines: cd $REPO && python -m export trt ARTIFACTS --int4 --max-batch 1 [--fixed-past]"
