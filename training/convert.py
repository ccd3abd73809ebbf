"""``python -m training convert``: public annotations -> the training format.

The official files ``trace-rt eval`` reads are read by the same readers
(:mod:`trace_rt.evaluation.annotations`), with ``--format`` (default ``auto``: by name
and layout): ``charades-sta`` (``charades_sta_train.txt``), ``qvhighlights``
(``highlight_train_release.jsonl``), ``youcook2`` (``youcookii_annotations_trainval.json``,
the ``--subset``, default ``training``), ``activitynet-captions`` (``train.json``) and
``coco-format`` (TimeIT/VTG-IT ``*.caption_coco_format.json``). Anything else is read as
``vtg-it``, three looser annotation styles (each file holds one kind; ``--kind auto``
tells them apart by their keys):

* dense captioning (ActivityNet Captions / YouCook2 / VTG-IT ``dvc``): per video
  ``timestamps`` (a list of ``[start, end]``) and ``sentences`` (or ``captions``), either
  as a dict keyed by video id or as a list of records with ``video``/``vid``;
* moment retrieval (Charades-STA / VTG-IT ``mr``): records with ``query`` (or
  ``sentence``/``caption``) and a span in ``timestamp``/``span``/``relevant_windows``
  (the first window);
* highlights (QVHighlights / VTG-IT ``vhd``): records with ``query``,
  ``relevant_clip_ids`` and ``saliency_scores`` (per clip, one score per annotator on
  0..4), or ``clip_scores`` (one score per clip); clips are ``clip_length`` seconds
  (default 2). Each salient clip becomes an event at the clip's centre with score
  mean + 1, i.e. on the 1..5 scale TRACE's prompt asks for.

Videos are found under ``--video-root`` by id as ``trace-rt eval`` finds them
(:class:`trace_rt.evaluation.videos.VideoIndex`: ``<id>``, ``<id>.<ext>``, or anywhere
below); an id that is not found becomes ``--video-root``/``<id>`` (``--video-ext``
appended when the id has no extension), which training then reports as missing. Ids that
are not plain file names are refused. Malformed records are reported with their id and
skipped or fatal per ``--on-bad-sample``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trace_rt.evaluation import annotations as ann
from trace_rt.evaluation.videos import InvalidVideoIdError, VideoIndex
from training.data import BadSampleError, parse_sample, report_bad, write_split

KINDS = ("auto", "dvc", "mr", "vhd")
FORMATS = (
    "auto", "vtg-it", "charades-sta", "qvhighlights", "youcook2", "activitynet-captions",
    "coco-format",
)  # fmt: skip


def detect_format(src: str | Path) -> str:
    """The official format of *src*, by its name and layout; ``vtg-it`` otherwise."""
    src = Path(src)
    if src.suffix == ".txt":
        return "charades-sta"
    if src.suffix == ".jsonl":
        return "qvhighlights"
    raw = ann.load_json(src)
    if isinstance(raw, dict) and isinstance(raw.get("database"), dict):
        return "youcook2"
    if isinstance(raw, dict) and isinstance(raw.get("annotations"), list):
        return "coco-format"
    if (
        isinstance(raw, dict)
        and raw
        and all(
            isinstance(v, dict) and "timestamps" in v and "sentences" in v for v in raw.values()
        )
    ):
        return "activitynet-captions"
    return "vtg-it"


def official_records(src: str | Path, fmt: str, subset: str = "training") -> list[dict]:
    """Records of an official file (read by ``trace-rt eval``'s readers) in the
    ``vtg-it`` shapes :func:`convert_record` takes."""
    if fmt == "charades-sta":
        items: list = ann.read_charades_txt(src)
    elif fmt == "qvhighlights":
        items = ann.read_qvhighlights(src)
    elif fmt == "youcook2":
        items = ann.read_youcook2(src, subset)
    elif fmt == "activitynet-captions":
        items = ann.read_activitynet([src])
    else:
        items = ann.read_coco_format(src)
    out = []
    for it in items:
        if isinstance(it, ann.MomentQuery):
            rec = {"id": f"{it.video}-mr-{it.qid}", "video": it.video, "query": it.query,
                   "timestamp": list(it.span), "duration": it.duration}  # fmt: skip
        elif isinstance(it, ann.HighlightQuery):
            rec = {"qid": it.qid, "video": it.video, "query": it.query, "duration": it.duration,
                   "relevant_clip_ids": list(it.relevant_clip_ids),
                   "saliency_scores": [list(s) for s in it.saliency_scores]}  # fmt: skip
        else:
            rec = {"video": it.video, "duration": it.duration,
                   "timestamps": [list(s) for s in it.segments],
                   "sentences": list(it.captions)}  # fmt: skip
        out.append({k: v for k, v in rec.items() if v is not None})
    return out


def _records(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, dict) and "samples" not in raw:
        # {video_id: {...}}: ActivityNet-style.
        return [{"video": k, **v} for k, v in raw.items() if isinstance(v, dict)]
    if isinstance(raw, dict):
        raw = raw["samples"]
    if not isinstance(raw, list):
        raise ValueError("annotations must be a list of records or a dict keyed by video id")
    return raw


def guess_kind(rec: dict[str, Any]) -> str:
    if "saliency_scores" in rec or "clip_scores" in rec:
        return "vhd"
    if (
        "sentences" in rec
        or "captions" in rec
        or (
            isinstance(rec.get("timestamps"), list)
            and rec["timestamps"]
            and isinstance(rec["timestamps"][0], list)
        )
    ):
        return "dvc"
    return "mr"


def _video(rec: dict[str, Any], root: Path, ext: str, index: VideoIndex | None) -> tuple[str, Path]:
    vid = rec.get("video") or rec.get("vid") or rec.get("video_id")
    if not isinstance(vid, str) or not vid:
        raise BadSampleError(str(rec.get("qid", "?")), "record names no video")
    try:
        found = index.find(vid) if index is not None else None
    except InvalidVideoIdError as e:
        raise BadSampleError(str(rec.get("qid", vid)), str(e)) from None
    if found is not None:
        return vid, found
    name = vid if Path(vid).suffix else vid + ext
    return vid, root / name


def convert_record(
    rec: dict[str, Any], kind: str, root: Path, ext: str, n: int, index: VideoIndex | None = None
) -> dict:
    vid, path = _video(rec, root, ext, index)
    kind = guess_kind(rec) if kind == "auto" else kind
    sid = str(rec.get("id") or rec.get("qid") or f"{Path(vid).stem}-{kind}-{n}")
    out: dict[str, Any] = {"id": sid, "video": str(path), "task": kind}
    if isinstance(rec.get("duration"), (int, float)):
        out["duration"] = float(rec["duration"])
    if kind == "dvc":
        spans = rec.get("timestamps")
        caps = rec.get("sentences", rec.get("captions"))
        if not isinstance(spans, list) or not isinstance(caps, list) or len(spans) != len(caps):
            raise BadSampleError(sid, "dense captions need equally long timestamps and sentences")
        out["events"] = [{"timestamps": s, "caption": c} for s, c in zip(spans, caps, strict=True)]
    elif kind == "mr":
        query = rec.get("query", rec.get("sentence", rec.get("caption")))
        span = rec.get("timestamp", rec.get("span", rec.get("relevant_windows")))
        if isinstance(span, list) and span and isinstance(span[0], list):
            span = span[0]
        out["query"] = query
        out["events"] = [{"timestamps": span}]
    else:
        clip = float(rec.get("clip_length", 2.0))
        out["query"] = rec.get("query")
        events = []
        if "saliency_scores" in rec:
            ids, scores = rec.get("relevant_clip_ids"), rec["saliency_scores"]
            if not isinstance(ids, list) or not isinstance(scores, list) or len(ids) != len(scores):
                raise BadSampleError(sid, "relevant_clip_ids and saliency_scores differ in length")
            pairs = [
                (int(c), sum(s) / len(s) if isinstance(s, list) else s)
                for c, s in zip(ids, scores, strict=True)
            ]
        else:
            pairs = [(c, s) for c, s in enumerate(rec["clip_scores"]) if s and s > 0]
        for c, s in pairs:
            t = round((c + 0.5) * clip, 1)
            events.append({"timestamps": [t], "scores": [round(min(float(s) + 1.0, 5.0), 1)]})
        out["events"] = events
    return out


def convert(
    src: str | Path, dst: str | Path, *, kind: str = "auto", video_root: str | Path = ".",
    video_ext: str = ".mp4", on_bad: str = "fail", fmt: str = "auto", subset: str = "training",
) -> int:  # fmt: skip
    """Convert *src* into the split file *dst*; returns the number of samples written."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "vtg-it":
        records = _records(ann.load_json(src))
    else:
        records = official_records(src, fmt, subset)
    dst = Path(dst)
    root = Path(video_root).resolve()
    index = VideoIndex(root) if root.is_dir() else None
    samples = []
    for n, rec in enumerate(records):
        try:
            if not isinstance(rec, dict):
                raise BadSampleError(f"#{n}", "a record must be an object")
            d = convert_record(rec, kind, root, video_ext, n, index)
            samples.append(parse_sample(d, dst.parent, n))
        except BadSampleError as e:
            report_bad(e, on_bad)
    write_split(dst, samples, dst.parent)
    return len(samples)
