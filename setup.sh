#!/usr/bin/env bash
# Set up a development environment in .venv: the runtime, the PyTorch model, test tools.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# METEOR/SODA_c in `trace-rt eval` also need Java; without it they are reported unavailable.
command -v java >/dev/null || echo "note: no Java runtime; for METEOR/SODA_c: sudo apt-get install -y default-jre-headless"
echo "ready: .venv ($(.venv/bin/python -c 'import torch, trace_rt; print("trace-rt", trace_rt.__version__, "torch", torch.__version__)'))"
# Show it working: a tiny random-weight checkpoint answers all three tasks on a generated
# clip (seconds; files in demo/). SETUP_DEMO=0 skips it.
if [ "${SETUP_DEMO:-1}" != 0 ]; then
  .venv/bin/python -m training demo --out demo
fi
