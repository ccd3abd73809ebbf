"""Small annotation files in each benchmark's official format, written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

from trace_rt.evaluation.annotations import CaptionedVideo, HighlightQuery, MomentQuery

CHARADES = [
    MomentQuery("0", "AAA", "a person opens a door.", (0.0, 1.5)),
    MomentQuery("1", "BBB", "someone sits down", (1.0, 2.5)),
    MomentQuery("2", "ZZZ", "this video is missing", (0.5, 1.0)),
]
HIGHLIGHTS = [
    HighlightQuery("7", "AAA", "a red square", 6.0, (0, 2), ((4.0, 2.0, 3.0), (1.0, 1.0, 4.0))),
    HighlightQuery("9", "CCC", "the colour changes", 6.0, (1,), ((2.0, 2.0, 2.0),)),
]
YOUCOOK = [
    CaptionedVideo("CCC", 3.0, ((0.0, 1.0), (1.5, 3.0)), ("crack the eggs", "whisk them"), (2, 2)),
    CaptionedVideo("AAA", 3.0, ((0.5, 2.0),), ("add salt",), (2, 2)[:1]),
]
ANET = [
    CaptionedVideo("v_BBB", 3.0, ((0.0, 2.0), (1.0, 3.0)), ("A man runs.", "He jumps."), (1, 1)),
]


def write_charades(path: Path, items=CHARADES) -> Path:
    path.write_text("".join(f"{q.video} {q.span[0]} {q.span[1]}##{q.query}\n" for q in items))
    return path


def write_coco_mr(path: Path, items=CHARADES) -> Path:
    anns = [{"image_id": q.video, "caption": q.query, "timestamp": list(q.span), "id": int(q.qid),
             "duration": 3.0} for q in items]  # fmt: skip
    path.write_text(json.dumps({"annotations": anns}))
    return path


def write_qvhighlights(path: Path, items=HIGHLIGHTS) -> Path:
    lines = [
        json.dumps(
            {
                "qid": int(q.qid),
                "query": q.query,
                "duration": q.duration,
                "vid": q.video,
                "relevant_clip_ids": list(q.relevant_clip_ids),
                "saliency_scores": [list(s) for s in q.saliency_scores],
                "relevant_windows": [[0, 2]],
            }
        )
        for q in items
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_youcook2(path: Path, items=YOUCOOK) -> Path:
    db = {
        v.video: {"duration": v.duration, "subset": "validation", "recipe_type": "101",
                  "video_url": f"https://www.youtube.com/watch?v={v.video}",
                  "annotations": [{"segment": list(s), "id": k, "sentence": c} for k, (s, c)
                                  in enumerate(zip(v.segments, v.captions, strict=True))]}
        for v in items
    }  # fmt: skip
    db["TRAIN1"] = {"duration": 9.0, "subset": "training", "recipe_type": "101",
                    "annotations": [{"segment": [0, 1], "id": 0, "sentence": "x"}]}  # fmt: skip
    path.write_text(json.dumps({"database": db}))
    return path


def write_activitynet(path: Path, items=ANET) -> Path:
    raw = {v.video: {"duration": v.duration, "timestamps": [list(s) for s in v.segments],
                     "sentences": list(v.captions)} for v in items}  # fmt: skip
    path.write_text(json.dumps(raw))
    return path


def write_coco_dvc(path: Path, items=YOUCOOK) -> Path:
    anns = [{"image_id": f"{v.video}.mp4", "segments": [list(s) for s in v.segments],
             "pure_cap": ". ".join(v.captions), "duration": v.duration} for v in items]  # fmt: skip
    path.write_text(json.dumps({"annotations": anns}))
    return path
