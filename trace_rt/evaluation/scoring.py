"""Predictions -> the original's prediction files -> metrics.

Predictions come as our ``predictions.jsonl`` (one record per query or video, with the
original's lists under ``release`` and our parser's ``events``) or as the original's own
files: its raw results (``fmt_*_result.json``: ``video``, ``id``, ``timestamps``,
``scores``, ``captions``), to which the reformat rules are applied here, or its
reformatted predictions (``refmt_*``: moment retrieval ``{qid: {"timestamp": ...}}``,
highlights ``[{"qid", "pred_saliency_scores"}]``, dense captions ``{video: [{"timestamp",
"caption"}]}``), scored as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trace_rt.evaluation import annotations as ann
from trace_rt.evaluation import reformat as rf
from trace_rt.evaluation.dense import dense_metrics
from trace_rt.evaluation.metrics import gt_clip_scores, highlight_metrics, moment_metrics
from trace_rt.evaluation.videos import strip_video_ext


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Records of a JSON Lines file; a torn last line (an interrupted write) is skipped
    and counted, a malformed line elsewhere is an error naming file and line."""
    if not path.is_file():
        return [], 0
    lines = path.read_text(encoding="utf-8").splitlines()
    out, torn = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if n == len(lines):
                torn += 1
                continue
            raise ann.AnnotationError([f"{path}:{n}: not a JSON object ({e})"]) from None
        out.append(rec)
    return out, torn


def load_predictions(path: str | Path, task: str) -> tuple[str, dict[str, Any]]:
    """Read a predictions file; returns ``(kind, key -> prediction)`` with kind
    ``"records"`` (ours or the original's raw results: rules still to apply) or
    ``"refmt"`` (the original's reformatted predictions)."""
    path = Path(path)
    if not path.is_file():
        raise ann.AnnotationError([f"{path}: predictions file not found"])
    if path.suffix == ".jsonl":
        recs, _ = read_jsonl(path)
        return "records", {str(r["key"]): r for r in recs if "release" in r and "key" in r}
    raw = ann.load_json(path)
    if isinstance(raw, list) and raw and isinstance(raw[0], dict) and "captions" in raw[0]:
        out = {}
        for r in raw:
            key = (
                strip_video_ext(str(r.get("video", "")).split("/")[-1])
                if task == "dvc"
                else str(r.get("id"))
            )
            out[key] = rf.release_from_original(r)
        return "records", out
    if task == "mr" and isinstance(raw, dict):
        return "refmt", {str(k): v.get("timestamp") for k, v in raw.items() if isinstance(v, dict)}
    if task == "vhd" and isinstance(raw, list):
        return "refmt", {str(r["qid"]): r["pred_saliency_scores"] for r in raw if "qid" in r}
    if task == "dvc" and isinstance(raw, dict):
        return "refmt", {strip_video_ext(k): v for k, v in raw.items() if isinstance(v, list)}
    raise ann.AnnotationError([f"{path}: not a predictions file for task {task!r}"])


def to_original_format(
    task: str, items: Sequence[Any], records: Mapping[str, Any], rules: str
) -> Any:
    """The original's reformatted prediction file for *records* (``reformat_<task>.py``
    output), keyed as it keys them."""
    if task == "mr":
        out: Any = {}
        for q in items:
            rec = records.get(q.qid)
            if rec is None or rf.is_dropped(rec, rules):
                continue
            span = rf.to_moment(rec, rules)
            out[q.qid] = {"timestamp": span, "query": q.query, "vid": q.video} if span else {}
        return out
    if task == "vhd":
        return [
            {"qid": q.qid, "query": q.query, "vid": q.video,
             "pred_saliency_scores": rf.to_clip_scores(records[q.qid], q.duration, rules)}
            for q in items
            if q.qid in records and not rf.is_dropped(records[q.qid], rules)
        ]  # fmt: skip
    by_stem = {strip_video_ext(k): r for k, r in records.items()}
    out = {}
    for v in items:
        rec = by_stem.get(strip_video_ext(v.video))
        if rec is not None and not rf.is_dropped(rec, rules):
            out[v.video] = rf.to_dense_events(rec, rules)
    return out


def score(
    task: str,
    items: Sequence[Any],
    predictions: Mapping[str, Any],
    *,
    kind: str = "records",
    rules: str = "original",
    use_java: bool | None = None,
) -> dict[str, Any]:
    """Metrics of *predictions* (from :func:`load_predictions` or the runner) on *items*."""
    refmt = predictions if kind == "refmt" else None
    if refmt is None:
        refmt = to_original_format(task, items, predictions, rules)
    if task == "mr":
        gts = {q.qid: q.span for q in items}
        preds = {k: (v.get("timestamp") if isinstance(v, dict) else v) for k, v in refmt.items()}
        preds = {k: (p if p else None) for k, p in preds.items()}
        out = moment_metrics(gts, preds, sort_spans=rules == "lenient")
    elif task == "vhd":
        pred_scores = (
            {str(r["qid"]): r["pred_saliency_scores"] for r in refmt}
            if isinstance(refmt, list)
            else refmt
        )
        gts = {
            q.qid: gt_clip_scores(int(q.duration / 2), q.relevant_clip_ids, q.saliency_scores)
            for q in items
        }
        levels = highlight_metrics(gts, pred_scores)
        out = {"mAP": levels["VeryGood"]["mAP"], "HIT@1": levels["VeryGood"]["HIT@1"]}
        out["levels"] = levels
        out.update(queries=len(items), predictions=levels["VeryGood"]["queries"])
    else:
        gts_v = {strip_video_ext(v.video): v for v in items}
        preds_v = {strip_video_ext(k): v for k, v in refmt.items()}
        out = dense_metrics(gts_v, preds_v, use_java=use_java)
        out.update(queries=len(items), predictions=out["videos"])
    out["rules"] = rules if kind == "records" else "as given (reformatted predictions)"
    return out
