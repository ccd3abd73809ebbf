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
# The bench's peers (benchmarks/peers/, the `peers` extra): onnxruntime-genai, and
# llama-cpp-python compiled from source for this CPU (~4 min on 2 cores; pip keeps the wheel
# it builds in its usual cache), then llama.cpp's converter from the same release's source
# distribution, unpacked into .venv/share. SETUP_PEERS=0 skips them: the bench and its
# tests then report the peers as skipped, with the reason.
# A failure here (no compiler, no package index) is reported and does not stop the setup.
if [ "${SETUP_PEERS:-1}" != 0 ]; then
  echo "installing the bench's peers (compiles llama-cpp-python: minutes) ..."
  if ! { CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" .venv/bin/python -m pip install -q -e ".[peers]" \
         && .venv/bin/python -m benchmarks.peers converter; }; then
    echo "note: the peers extra did not install; the bench and its tests skip the peers, saying why"
  fi
fi
# System tools some features and tests use: Chromium (the HTML report tests open the pages
# in it), Java (METEOR/SODA_c in `trace-rt eval`), the ffmpeg CLI (the bench's video stage
# is measured against it) and nginx (deploy/local/). Installed from Debian's packages when
# this runs as root with apt-get (SETUP_SYSTEM=0 skips); otherwise the tests that need them
# are skipped with the reason, and eval reports those two metrics as unavailable.
missing=""
command -v chromium >/dev/null || missing="$missing chromium"
command -v java >/dev/null || missing="$missing default-jre-headless"
command -v ffmpeg >/dev/null || missing="$missing ffmpeg"
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
if [ -n "$missing" ]; then
  if [ "${SETUP_SYSTEM:-1}" != 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing$missing (Debian packages) ..."
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } \
      >/dev/null || echo "note: could not install$missing; the tests that need them are skipped"
  else
    echo "note: missing$missing (sudo apt-get install -y$missing); the tests that need them are skipped"
  fi
fi
echo "ready: .venv ($(.venv/bin/python -c 'import torch, trace_rt; print("trace-rt", trace_rt.__version__, "torch", torch.__version__)'))"
# Show it working: a tiny random-weight checkpoint answers all three tasks on a generated
# clip (seconds; files in demo/). SETUP_DEMO=0 skips it.
if [ "${SETUP_DEMO:-1}" != 0 ]; then
  .venv/bin/python -m training demo --out demo
fi
