"""What frame-aligned timestamps change: moment retrieval and dense captioning on a split of
the synthetic set, the same model decoded with ``timestamps="free"``, ``"frames"`` and free with
``constrained=True``.

Usage: python -m benchmarks.frame_aligned_synthetic MODEL_DIR VAL_JSON [--out FILE.json]

Every query goes through :class:`trace_rt.pipeline.Pipeline` as ``trace-rt run`` answers
it (greedy, 32 new tokens for mr, 64 for dvc); predictions become spans/events by the
original's reformat rules and are scored by ``trace-rt eval``'s metrics (dense captioning
without the Java scorers: F1 and CIDEr). Also counted: how many predicted timestamps are
frame times, and how many generations changed at all.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from trace_rt.constrained import frame_time_strings
from trace_rt.evaluation import reformat as rf
from trace_rt.evaluation.annotations import CaptionedVideo
from trace_rt.evaluation.dense import dense_metrics
from trace_rt.evaluation.metrics import moment_metrics
from trace_rt.evaluation.runner import infer_backend
from trace_rt.generate import GenerationConfig
from trace_rt.pipeline import Pipeline
from training.data import load_split


def _on_frames(res: dict[str, Any]) -> tuple[int, int]:
    allowed = set(frame_time_strings(res["frame_times"]))
    ts = [t for e in res["events"] for t in e["timestamps"]]
    return sum(format(t, "0>6.1f") in allowed for t in ts), len(ts)


def measure(model: str, split: str, limit: int | None = None) -> dict[str, Any]:
    pipe = Pipeline.from_dir(model, infer_backend(model))
    tok, ids = pipe.tokenizer, pipe.config.ids
    samples = load_split(split)[: limit or None]
    out: dict[str, Any] = {"model": model, "split": split}
    tokens: dict[str, dict[str, list[int]]] = {}
    # "constrained": free timestamps under the well-formedness/duration grammar, the
    # baseline that separates "well formed" from "on a frame".
    for mode in ("free", "frames", "constrained"):
        t0 = time.perf_counter()
        gts, preds, dgts, dpreds = {}, {}, {}, {}
        hits = total = 0
        tokens[mode] = {}
        for s in samples:
            budget = 32 if s.task == "mr" else 64
            gen = GenerationConfig(
                max_new_tokens=budget,
                timestamps="frames" if mode == "frames" else "free",
                constrained=mode == "constrained",
            )
            res = pipe.run(s.video, s.task, query=s.query, gen=gen)
            tokens[mode][s.id] = res["token_ids"]
            h, n = _on_frames(res)
            hits, total = hits + h, total + n
            rec = {
                "release": rf.release_output(res["token_ids"], tok, ids).to_dict(),
                "events": rf.lenient_events(res["token_ids"], tok, ids),
            }
            ev = s.events
            if s.task == "mr":
                gts[s.id] = (ev[0].timestamps[0], ev[0].timestamps[1])
                if not rf.is_dropped(rec, "original"):
                    preds[s.id] = rf.to_moment(rec, "original")
            elif s.task == "dvc":
                dgts[s.id] = CaptionedVideo(
                    s.id, s.duration, tuple((e.timestamps[0], e.timestamps[1]) for e in ev),
                    tuple(e.caption for e in ev), tuple(0 for _ in ev),
                )  # fmt: skip
                dpreds[s.id] = (
                    [] if rf.is_dropped(rec, "original") else rf.to_dense_events(rec, "original")
                )
        dense = dense_metrics(dgts, dpreds, use_java=False) if dgts else {}
        out[mode] = {
            "mr": moment_metrics(gts, preds) if gts else None,
            "dvc": {k: dense.get(k) for k in ("videos", "F1", "Precision", "Recall", "CIDEr")},
            "timestamps_on_frame_times": [hits, total],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    changed = sum(tokens["free"][k] != tokens["frames"][k] for k in tokens["free"])
    out["generations_changed"] = [changed, len(tokens["free"])]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("split")
    p.add_argument("--limit", type=int)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    res = measure(a.model, a.split, a.limit)
    text = json.dumps(res, indent=1, default=str)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
