#!/usr/bin/env bash
# Issue 14's synthetic hard case by the lookup curriculum (benchmarks/results/
# training-synthetic-hard-tiny-cpu.md, eleventh attempt): every clip shows two shapes, the
# query names one.
#   Stage A (recipe tiny-synthetic-lookup-words, preset tiny-lookup: `tiny` with a RoPE
#   base of 300) learns the lookup with each frame shown as its shapes' colour words,
#   each colour in its own slot (frame_word_slots). Whether a start learns it is a chance
#   event that shows by step PICK_AT (3000) of its 8000, so several starts (STARTS, one
#   per core at a time) run to PICK_AT, are compared on held-out *dev* clips (a set of
#   their own, not the evaluation's), and the best continues (--resume: the same run).
#   Stage B (tiny-synthetic-lookup, --init A) moves it to pixels: vision tower and
#   projector train (and the LLM at a tenth of the rate), pulled through the LLM and
#   towards the same slot layout.
# Stage A is evaluated on words (benchmarks/training_words_eval.py), stage B on pixels, on
# the held-out queries, with the count of answers closer to the queried shape's window
# than to the other's. The budget is the user CPU of every training and picking command
# together (15 CPU minutes), printed at the end.
# Usage: [STARTS="4 5 6"] [PICK_AT=3000] benchmarks/training_synthetic_lookup.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/trace-rt-train-lookup}
STARTS=${STARTS:-4 5 6}
PICK_AT=${PICK_AT:-3000}
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 threads on a shared 2-core box spin
mkdir -p "$WORK"
SYNTH=(--min-shapes 2 --max-shapes 2 --tasks mr --frame-words)
$PY -m training synth-data "$WORK/data" --videos 800 --seed 0 "${SYNTH[@]}"
$PY -m training synth-data "$WORK/dev" --videos 80 --seed 1 --val-fraction 1.0 "${SYNTH[@]}"

timed() {  # timed NAME CMD...: run CMD, keep its user CPU seconds in $WORK/NAME.cpu
  local name=$1
  shift
  /usr/bin/time -f "%U" -o "$WORK/$name.cpu" "$@" > "$WORK/$name.log" 2> "$WORK/$name.err" || {
    tail -n 20 "$WORK/$name.err" >&2
    return 1
  }
}

# Stage A: the starts, to PICK_AT, as many at once as there are cores.
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
running=0
for seed in $STARTS; do
  timed "stage-a-$seed" $PY -m training train --config tiny-synthetic-lookup-words \
      --data "$WORK/data" --out "$WORK/stage-a-$seed" --preset tiny-lookup --seed "$seed" \
      --until "$PICK_AT" --no-progress &
  running=$((running + 1))
  if [ "$running" -ge "$cores" ]; then wait -n; running=$((running - 1)); fi
done
wait
best="" best_r=-1
step=$(printf "step-%07d" "$PICK_AT")
for seed in $STARTS; do
  timed "pick-$seed" $PY -m benchmarks.training_words_eval "$WORK/stage-a-$seed/.train/$step" \
      "$WORK/dev/val.json"
  r=$($PY -c 'import json,sys; print(json.loads(sys.stdin.read())["model_metrics"]["R@0.5"])' \
      < "$WORK/pick-$seed.log")
  echo "start $seed at step $PICK_AT: R@0.5 $r on the dev clips, shown as words"
  if $PY -c "import sys; sys.exit(not float('$r') > float('$best_r'))"; then best=$seed best_r=$r; fi
done
echo "continuing start $best"
if $PY -c "import sys; sys.exit(not float('$best_r') < 65)"; then
  # Starts without the lookup stood at 52-62 % here, those with it at 69-81 %.
  echo "warning: no start shows the lookup at step $PICK_AT (best dev R@0.5 $best_r %);" \
       "expect the answers to ignore the query; try other STARTS" >&2
fi
timed stage-a-resume $PY -m training train --config tiny-synthetic-lookup-words \
    --data "$WORK/data" --out "$WORK/stage-a-$best" --resume --no-progress
ln -sfn "stage-a-$best" "$WORK/stage-a"
timed stage-b $PY -m training train --config tiny-synthetic-lookup \
    --data "$WORK/data" --out "$WORK/stage-b" --init "$WORK/stage-a" --no-progress
$PY - "$WORK" <<'PY'
import sys
from pathlib import Path
work = Path(sys.argv[1])
parts = {p.stem: float(p.read_text().split()[-1]) for p in sorted(work.glob("*.cpu"))}
print("user CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
      + f"; total {sum(parts.values()):.1f}")
PY

$PY -m benchmarks.training_words_eval "$WORK/stage-a" "$WORK/data/val.json" \
    --out "$WORK/eval-stage-a-words.json" >/dev/null
$PY -m training eval "$WORK/stage-b" --data "$WORK/data/val.json" --out "$WORK/eval-stage-b.json" >/dev/null
for stage in stage-a-words stage-b; do
  $PY - "$WORK/eval-$stage.json" "$WORK/data/synth.json" "$stage" <<'PY'
import json, sys
from pathlib import Path
ev, synth, stage = json.loads(Path(sys.argv[1]).read_text()), json.loads(Path(sys.argv[2]).read_text()), sys.argv[3]
shapes = {Path(v["video"]).stem: v["shapes"] for v in synth["videos"]}
def iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0
closer = {"queried": 0, "other": 0}
spans = {}
for row in ev["predictions"]:
    video, _, k = row["id"].split("-")
    me, other = shapes[video][int(k)], shapes[video][1 - int(k)]
    spans.setdefault(video, []).append(row["pred"])
    if row["pred"]:
        a = iou(row["pred"], (me["start"], me["end"]))
        b = iou(row["pred"], (other["start"], other["end"]))
        closer["queried"] += a > b
        closer["other"] += b > a
same = sum(len(v) == 2 and v[0] == v[1] for v in spans.values())
m = {k: "n/a" if v is None else f"{v:.1f}" if isinstance(v, float) else v
     for k, v in ev["model_metrics"].items()}
print(f"{stage}: R@0.3 {m['R@0.3']} R@0.5 {m['R@0.5']} R@0.7 {m['R@0.7']} "
      f"mIoU {m['mIoU']} on {m['queries']} queries; closer to the queried / the other "
      f"shape {closer['queried']} / {closer['other']}; same span for both queries in "
      f"{same} of {len(spans)} clips")
PY
done
