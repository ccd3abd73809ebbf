#!/usr/bin/env bash
# The edge install on Python 3.10, JetPack 6's Python, as far as an x86-64 machine allows:
#
#   bash deploy/jetson/py310.sh [--setup] [VENV]   (default: ~/.cache/trace-rt/py310-edge)
#
# --setup: steps 1-2 only (.ci/run; the test suite then runs step 3 as the [py310] case of
# tests/test_edge.py, which looks for this venv). Exit 2: no Python 3.10 here.
#
#   1. resolution: pip picks cp310 manylinux aarch64 wheels for every dependency the
#      runtime declares (pyproject.toml's [project] dependencies, no extras) plus
#      onnxruntime: what `pip install` on a Jetson would download, without torch;
#   2. install: an x86-64 Python 3.10 venv (pyenv's, or PY310=/path/to/python3.10) gets
#      trace-rt without extras, onnxruntime, and onnx (only for the CPU stand-in of
#      TensorRT's ONNX parser, tests/fake_tensorrt.py); no torch or transformers may come
#      with them;
#   3. run: tests/test_edge.py's edge path (trace-rt run, plan, watch, `export trt --int4`
#      with the decode step, the TensorRT backend on the stand-ins) in that venv, with
#      torch, transformers and safetensors.torch made unimportable.
#
# Exit 0 and "py310 edge path: ok" on success. Steps 1-2 reuse the venv and pip's cache
# (the first run downloads ~90 MB). Not covered: an aarch64 Python 3.10 running the path
# (Debian's archive, the only one reachable here, has no Python 3.10; emulate.sh runs
# bookworm's 3.11 under qemu), JetPack's own TensorRT and onnxruntime-gpu.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SETUP_ONLY=0
if [ "${1:-}" = --setup ]; then SETUP_ONLY=1; shift; fi
VENV=${1:-${HOME}/.cache/trace-rt/py310-edge}
HOST_PY=${PYTHON:-$REPO/.venv/bin/python}
log() { echo "[py310] $*" >&2; }

find_py310() {
  if [ -n "${PY310:-}" ]; then echo "$PY310"; return; fi
  if command -v python3.10 >/dev/null && python3.10 -V >/dev/null 2>&1; then
    command -v python3.10; return
  fi
  local root
  root=$(pyenv root 2>/dev/null || echo "${HOME}/.pyenv")
  for p in "$root"/versions/3.10.*/bin/python3.10; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  return 1
}
PY310=$(find_py310) || {
  log "no Python 3.10 found (set PY310, or: pyenv install 3.10)"
  exit 2
}

# The runtime's declared dependencies, read from pyproject.toml (never a copy of them).
mapfile -t DEPS < <("$HOST_PY" - "$REPO/pyproject.toml" <<'PY'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
PY
)
DEPS+=("onnxruntime>=1.17")

# 1. What a Jetson's pip would pick: cp310, manylinux aarch64 up to glibc 2.35 (Ubuntu
#    22.04's), wheels only.
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
PLATFORMS=(--platform manylinux2014_aarch64)
for v in 17 24 26 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${v}_aarch64"); done
log "resolving ${DEPS[*]} for cp310 aarch64"
"$HOST_PY" -m pip download -q -d "$WHEELS" --only-binary=:all: --python-version 3.10 \
  --implementation cp "${PLATFORMS[@]}" "${DEPS[@]}"
ls "$WHEELS" | sed 's/^/[py310]   /' >&2
if ls "$WHEELS" | grep -Eiq '^(torch|transformers)-'; then
  log "torch or transformers came with the runtime's dependencies"; exit 1
fi

# 2. The x86-64 Python 3.10 venv.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY310 ($("$PY310" -V))"
  "$PY310" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${DEPS[@]}" "onnx>=1.15"
# trace-rt itself, without extras, checked against requires-python and its dependencies;
# built outside the repository so nothing is written into the work tree.
BUILD=$(mktemp -d)
trap 'rm -rf "$WHEELS" "$BUILD"' EXIT
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/trace_rt" "$BUILD/"  # the package
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$BUILD"
if "$VENV/bin/python" -m pip list 2>/dev/null | grep -Eiq '^(torch|transformers) '; then
  log "torch or transformers is installed in $VENV"; exit 1
fi

if [ "$SETUP_ONLY" = 1 ]; then echo "py310 edge venv: $VENV"; exit 0; fi

# 3. The edge path under 3.10 (the test drives the child with this venv's python).
log "running tests/test_edge.py's edge path with $("$VENV/bin/python" -V)"
TRACE_RT_EDGE_PYTHON="$VENV/bin/python" PYTHONPATH="$REPO" \
  "$HOST_PY" -m pytest -q -p no:cacheprovider "$REPO/tests/test_edge.py" -k "no_torch and py310"
echo "py310 edge path: ok"
