#!/usr/bin/env bash
# Issue 14's synthetic hard case by the lookup curriculum (eighth attempt in
# benchmarks/results/training-synthetic-hard-tiny-cpu.md): every clip shows two shapes, the
# query names one. Stage A (recipe tiny-synthetic-lookup-words) learns the lookup with the
# shapes' colour words in place of the frames; stage B (tiny-synthetic-lookup, --init A)
# moves it to pixels (ninth attempt: the slot target, LLM frozen). Stage A is evaluated on
# words (benchmarks/training_words_eval.py) and on pixels, stage B on pixels, on the
# held-out queries, with the count of answers closer to the queried shape's window than
# to the other's. Both recipes train with training/recipes/synthetic-prompts.json (no
# system text: half the CPU per step); the models carry it as prompts.json, which the
# evaluations read.
# Usage: benchmarks/training_synthetic_lookup.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/trace-rt-train-lookup}
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 threads on a shared 2-core box spin
mkdir -p "$WORK"
$PY -m training synth-data "$WORK/data" --videos 800 --seed 0 --min-shapes 2 --max-shapes 2 \
    --tasks mr --frame-words
# User CPU time of the two training commands together is the budget (15 CPU minutes).
/usr/bin/time -v $PY -m training train --config tiny-synthetic-lookup-words \
    --data "$WORK/data" --out "$WORK/stage-a" --preset tiny --no-progress 2> "$WORK/stage-a.err"
grep -E "User time|Maximum resident" "$WORK/stage-a.err"
/usr/bin/time -v $PY -m training train --config tiny-synthetic-lookup \
    --data "$WORK/data" --out "$WORK/stage-b" --init "$WORK/stage-a" --no-progress 2> "$WORK/stage-b.err"
grep -E "User time|Maximum resident" "$WORK/stage-b.err"
$PY -m benchmarks.training_words_eval "$WORK/stage-a" "$WORK/data/val.json" \
    --out "$WORK/eval-stage-a-words.json" >/dev/null
$PY -m training eval "$WORK/stage-a" --data "$WORK/data/val.json" --out "$WORK/eval-stage-a.json" >/dev/null
$PY -m training eval "$WORK/stage-b" --data "$WORK/data/val.json" --out "$WORK/eval-stage-b.json" >/dev/null
for stage in stage-a-words stage-a stage-b; do
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
