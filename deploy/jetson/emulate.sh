#!/usr/bin/env bash
# The torch-free runtime on aarch64, under qemu-user emulation: the `tiny` export through
# the onnxruntime backend on an arm64 Python, tokens compared with the same run on x86.
#
#   bash deploy/jetson/emulate.sh [WORKDIR]      (default: ~/.cache/trace-rt/arm64)
#
# What it builds (as root, Debian/Ubuntu host; no binfmt_misc or chroot needed: qemu-user
# runs the arm64 interpreter directly with -L SYSROOT):
#   1. qemu-user-static from the host's apt (the x86 package that carries qemu-aarch64-static);
#   2. an arm64 sysroot: python3.11 and its libraries, resolved by apt in a private apt
#      root with APT::Architecture=arm64 (the host's package index is left alone) and
#      unpacked with dpkg-deb -x;
#   3. the runtime's aarch64 wheels (numpy<2, av, sentencepiece, onnxruntime, rich) from
#      PyPI via `pip download --platform manylinux..._aarch64 --only-binary=:all:`;
#   4. on x86 (this venv, with torch): a `tiny` checkpoint, its ONNX export and a video;
#      then `trace-rt run --backend onnxruntime` on x86 and on emulated aarch64.
# Exit 0 and "aarch64 == x86" when, for every request, teacher-forced logits computed from
# the same pixels agree to 1e-4 of the logits' scale and the token ids are equal, or differ
# only from a near-tie on (see forced_logits.py).
# Note: Debian bookworm's python is 3.11; JetPack 6's is 3.10 (same wheels, cp310 tags).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-${HOME}/.cache/trace-rt/arm64}
PY=${PYTHON:-$REPO/.venv/bin/python}
PYV=3.11
mkdir -p "$WORK"
cd "$WORK"
log() { echo "[emulate] $*" >&2; }

# 1. qemu-user
if ! command -v qemu-aarch64-static >/dev/null; then
  log "installing qemu-user-static"
  apt-get install -y -q qemu-user-static >/dev/null || {
    apt-get update -q >/dev/null && apt-get install -y -q qemu-user-static >/dev/null; }
fi
QEMU=$(command -v qemu-aarch64-static)

# 2. arm64 sysroot with python3.11 (private apt root: arm64 only, empty dpkg status)
SYSROOT=$WORK/sysroot
if [ ! -x "$SYSROOT/usr/bin/python$PYV" ]; then
  APT=$WORK/apt
  mkdir -p "$APT"/etc/apt/{sources.list.d,preferences.d,apt.conf.d} \
    "$APT"/var/lib/apt/lists/partial "$APT"/var/cache/apt/archives/partial "$APT"/var/lib/dpkg
  : > "$APT/var/lib/dpkg/status"
  # The host's own Debian sources (same mirror and keyring), arm64 instead of amd64.
  cp /etc/apt/sources.list.d/*.sources "$APT/etc/apt/sources.list.d/" 2>/dev/null || true
  [ -f /etc/apt/sources.list ] && grep -v '^#' /etc/apt/sources.list | grep -i debian \
    > "$APT/etc/apt/sources.list" || true
  # Only Debian's own archives (other vendors' lists have no arm64 or no key here).
  for f in "$APT"/etc/apt/sources.list.d/*; do grep -qi 'debian' "$f" || rm -f "$f"; done
  opts=(-o "Dir=$APT" -o "Dir::State::status=$APT/var/lib/dpkg/status"
    -o APT::Architecture=arm64 -o APT::Architectures::=arm64
    -o Dir::Etc::trusted=/etc/apt/trusted.gpg -o Dir::Etc::trustedparts=/etc/apt/trusted.gpg.d
    -o Debug::NoLocking=1)
  log "resolving python$PYV for arm64"
  apt-get "${opts[@]}" update -q >/dev/null
  apt-get "${opts[@]}" install -y -q --download-only --no-install-recommends \
    "python$PYV" libstdc++6 libgcc-s1 >/dev/null
  rm -rf "$SYSROOT" && mkdir -p "$SYSROOT"
  for deb in "$APT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
fi
# qemu-user 7.x passes the host's /proc/cpuinfo and /sys CPU lists through to the guest;
# onnxruntime's cpuinfo library cannot parse x86 ones on aarch64 and the import crashes
# (SIGSEGV). qemu resolves guest paths under -L first, so give the sysroot the files of a
# 2-core Cortex-A78AE (Orin's CPU, MIDR part 0xd42).
mkdir -p "$SYSROOT/proc" "$SYSROOT/sys/devices/system/cpu"
for i in 0 1; do
  printf 'processor\t: %s\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd42\nCPU revision\t: 1\n\n' "$i"
done > "$SYSROOT/proc/cpuinfo"
for f in possible present online; do echo 0-1 > "$SYSROOT/sys/devices/system/cpu/$f"; done
echo 255 > "$SYSROOT/sys/devices/system/cpu/kernel_max"
ARMPY=(env -i HOME="$HOME" LANG=C.UTF-8 PYTHONPATH="$WORK/site:$REPO" PYTHONNOUSERSITE=1
  "$QEMU" -L "$SYSROOT" "$SYSROOT/usr/bin/python$PYV")
log "arm64 python: $("${ARMPY[@]}" -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])')"

# 3. aarch64 wheels of the runtime's dependencies (torch-free: the edge install)
if [ ! -f "$WORK/site/.done" ]; then
  log "downloading aarch64 wheels"
  plat=(--platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64
    --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64
    --python-version "$PYV" --implementation cp --only-binary=:all:)
  "$PY" -m pip download -q "${plat[@]}" -d "$WORK/wheels" \
    'numpy>=1.24,<2' 'av>=12' 'sentencepiece>=0.2,<0.2.3' 'onnxruntime>=1.17' 'rich>=13'
  "$PY" -m pip install -q "${plat[@]}" --no-index --find-links "$WORK/wheels" \
    --target "$WORK/site" --upgrade \
    'numpy>=1.24,<2' 'av>=12' 'sentencepiece>=0.2,<0.2.3' 'onnxruntime>=1.17' 'rich>=13'
  touch "$WORK/site/.done"
fi

# 4. the same request on both architectures
# Always afresh: a cached export from an older trace-rt could be refused by this one.
rm -rf "$WORK/ckpt" "$WORK/art"
log "x86: tiny checkpoint, ONNX export, test video"
PYTHONPATH=$REPO "$PY" -m training make-checkpoint "$WORK/ckpt" --preset tiny >/dev/null
PYTHONPATH=$REPO "$PY" -m export onnx "$WORK/ckpt" "$WORK/art" >/dev/null
PYTHONPATH=$REPO "$PY" -c "import sys; from tests.media import write_video; \
write_video(sys.argv[1], width=96, height=64, fps=10, n_frames=40)" "$WORK/clip.mp4"
# Three requests: greedy mr, sampled dvc (a varied token stream: any numeric difference
# between the architectures' kernels that flips a token shows), greedy vhd.
REQUESTS=(
  "--task mr --query a_red_circle_moves_left --max-new-tokens 24"
  "--task dvc --temperature 1.0 --seed 3 --max-new-tokens 48"
  "--task vhd --query a_red_circle_moves_left --max-new-tokens 24"
)
status=0
for i in "${!REQUESTS[@]}"; do
  # shellcheck disable=SC2206
  ARGS=(run "$WORK/clip.mp4" --model "$WORK/art" --backend onnxruntime ${REQUESTS[$i]})
  log "request $i: ${REQUESTS[$i]}"
  PYTHONPATH=$REPO "$PY" -m trace_rt "${ARGS[@]}" > "$WORK/x86-$i.json"
  t0=$(date +%s)
  "${ARMPY[@]}" -c "import sys, trace_rt
from trace_rt.cli import main
code = main(sys.argv[1:])
bad = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]
assert not bad, f'the edge path imported {bad}'
sys.exit(code)" "${ARGS[@]}" > "$WORK/aarch64-$i.json"
  log "request $i: aarch64 (emulated) took $(( $(date +%s) - t0 )) s"
  # Same forced token stream on both: logits must agree to float rounding at every step.
  PYTHONPATH=$REPO "$PY" "$REPO/deploy/jetson/forced_logits.py" "$WORK/art" "$WORK/clip.mp4" \
    "$WORK/x86-$i.json" "$WORK/x86-$i.npz"
  "${ARMPY[@]}" "$REPO/deploy/jetson/forced_logits.py" "$WORK/art" "$WORK/clip.mp4" \
    "$WORK/x86-$i.json" "$WORK/aarch64-$i.npz"
  "${ARMPY[@]}" "$REPO/deploy/jetson/forced_logits.py" "$WORK/art" "$WORK/clip.mp4" \
    "$WORK/x86-$i.json" "$WORK/aarch64-samepx-$i.npz" "$WORK/x86-$i.npz"
  "$PY" - "$WORK" "$i" <<'PYEOF' || status=1
import json, sys
import numpy as np
work, i = sys.argv[1:]
a, b = (json.load(open(f"{work}/{m}-{i}.json")) for m in ("x86", "aarch64"))
fa, fb = (np.load(f"{work}/{m}-{i}.npz") for m in ("x86", "aarch64"))
steps = [(fa[k], fb[k]) for k in fa.files if k != "pixels"]
pixel_diff = float(np.abs(fa["pixels"] - fb["pixels"]).max())
# The model alone: aarch64 fed x86's pixels (video decoding's SIMD paths differ by a few
# levels of colour between the architectures; onnxruntime's kernels should not).
fc = np.load(f"{work}/aarch64-samepx-{i}.npz")
model_diff = max(float(np.abs(fa[k] - fc[k]).max()) for k in fa.files if k != "pixels")
diff = max(float(np.abs(x - y).max()) for x, y in steps)
scale = max(float(np.abs(x).max()) for x, _ in steps)
# Steps where the machines' argmax differ, with x86's margin between its top two logits.
ties = []
for n, (x, y) in enumerate(steps):
    if int(x.argmax()) != int(y.argmax()):
        top = np.sort(x)[-2:]
        ties.append({"step": n, "margin": float(top[1] - top[0])})
same = a["token_ids"] == b["token_ids"]
first = next((n for n, (p, q) in enumerate(zip(a["token_ids"], b["token_ids"])) if p != q), None)
close = model_diff <= 1e-4 * scale  # same inputs: float rounding only; a fault is O(scale)
near_ties = all(t["margin"] <= 4 * diff for t in ties)
print(json.dumps({"request": i, "tokens_equal": same, "first_difference": first,
                  "n_tokens": len(a["token_ids"]), "distinct": len(set(a["token_ids"])),
                  "forced_steps": len(steps), "max_abs_pixel_diff": pixel_diff,
                  "max_abs_logit_diff": diff, "same_pixels_max_abs_logit_diff": model_diff,
                  "logit_scale": scale, "argmax_differs_at": ties}))
# Pass: given the same pixels the logits agree to float rounding, and the tokens are equal
# or differ only from a near-tie on (the decoded pixels differ by a few colour levels).
sys.exit(0 if close and (same or (ties and near_ties)) else 1)
PYEOF
done
[ $status = 0 ] && echo "aarch64 == x86" || echo "aarch64 != x86"
exit $status
