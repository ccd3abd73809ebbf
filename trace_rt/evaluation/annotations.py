"""Readers for the benchmarks' annotation files, as they are published.

Every reader validates what it reads and names the file and line (JSON Lines, text) or
the file and record (JSON) of each problem; :class:`AnnotationError` lists them all (up
to :data:`MAX_LISTED`) instead of stopping at the first. Video ids become file names
under ``--videos`` (:mod:`trace_rt.evaluation.videos`), so ids are checked there.

Formats:

* Charades-STA ``charades_sta_test.txt``: ``VID START END##sentence`` per line; the query
  id is the line's 0-based index among non-empty lines (the order TimeIT's coco-format
  conversion numbers them in).
* TimeIT / VTG-IT ``*.caption_coco_format.json``: ``{"annotations": [...]}``; moment
  retrieval records carry ``image_id``, ``caption``, ``timestamp`` and ``id``; dense
  captioning records ``image_id``, ``segments`` and ``pure_cap`` (YouCook2, split at
  ``". "``) or ``caption`` (ActivityNet, split at ``"."``, pieces of <= 5 characters
  dropped), the rules of the original's ``eval_dvc.py``.
* QVHighlights ``highlight_val_release.jsonl``: one query per line with ``qid``,
  ``query``, ``duration``, ``vid``, ``relevant_clip_ids``, ``saliency_scores`` (three
  annotators, 0..4) and ``relevant_windows``.
* YouCook2 ``youcookii_annotations_trainval.json``: ``{"database": {vid: {"subset",
  "duration", "annotations": [{"segment", "sentence"}]}}}``; the ``validation`` subset.
* ActivityNet Captions ``val_1.json`` / ``val_2.json``: ``{vid: {"duration",
  "timestamps", "sentences"}}``; several files are several annotation sets ("splits" of
  the original's dense-captioning evaluation) of the same videos.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_rt.errors import InputError

MAX_LISTED = 10
MAX_FILE_BYTES = 2 << 30  # an annotation file is text; a bigger one is a mistake


class AnnotationError(InputError):
    """An annotation file is unreadable or does not have its benchmark's layout."""

    def __init__(self, problems: list[str]):
        shown = problems[:MAX_LISTED]
        more = len(problems) - len(shown)
        text = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
        head = f"{len(problems)} problem(s) in the annotations:\n  " if len(problems) > 1 else ""
        super().__init__(head + text)
        self.problems = problems


@dataclass(frozen=True)
class MomentQuery:
    """One moment-retrieval query: find *span* of *video* described by *query*."""

    qid: str
    video: str
    query: str
    span: tuple[float, float]
    duration: float | None = None


@dataclass(frozen=True)
class HighlightQuery:
    """One QVHighlights query: per-clip saliency of three annotators (0..4)."""

    qid: str
    video: str
    query: str
    duration: float
    relevant_clip_ids: tuple[int, ...]
    saliency_scores: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class CaptionedVideo:
    """One dense-captioning video: its events, and the annotation set ("split") of each."""

    video: str
    duration: float | None
    segments: tuple[tuple[float, float], ...]
    captions: tuple[str, ...]
    splits: tuple[int, ...]


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")

    def raise_if_any(self) -> None:
        if self.items:
            raise AnnotationError(self.items)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise AnnotationError([f"{path}: annotation file not found"])
    if path.stat().st_size > MAX_FILE_BYTES:
        raise AnnotationError([f"{path}: larger than {MAX_FILE_BYTES >> 30} GiB"])
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError([f"{path}: not readable UTF-8 text ({e})"]) from None


def load_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    path = Path(path)
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError([f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})"]) from None
    except RecursionError:
        raise AnnotationError([f"{path}: JSON nested too deeply"]) from None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _span(v: Any) -> tuple[float, float] | None:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        return None
    a, b = _number(v[0]), _number(v[1])
    if a is None or b is None or a < 0 or b < 0:
        return None
    return (a, b)


def _text(v: Any) -> str | None:
    return v.strip() if isinstance(v, str) and v.strip() else None


def read_charades_txt(path: str | Path) -> list[MomentQuery]:
    """Charades-STA's ``VID START END##sentence`` lines (``charades_sta_test.txt``)."""
    path = Path(path)
    out, bad = [], _Problems()
    n = -1
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        n += 1
        head, sep, sentence = line.partition("##")
        parts = head.split()
        span = None
        if len(parts) == 3:
            try:
                span = _span([float(parts[1]), float(parts[2])])
            except ValueError:
                span = None
        if not sep or span is None or not _text(sentence):
            bad.add(f"{path}:{lineno}", f"expected 'VIDEO START END##sentence', got {line!r:.80}")
            continue
        out.append(MomentQuery(str(n), parts[0], sentence.strip(), span))
    bad.raise_if_any()
    return out


def read_qvhighlights(path: str | Path) -> list[HighlightQuery]:
    """QVHighlights' JSON Lines (``highlight_val_release.jsonl``)."""
    path = Path(path)
    out, bad = [], _Problems()
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.add(where, f"not valid JSON ({e.msg})")
            continue
        except RecursionError:
            bad.add(where, "JSON nested too deeply")
            continue
        try:
            out.append(_highlight(rec))
        except ValueError as e:
            bad.add(where, str(e))
    bad.raise_if_any()
    return out


def _highlight(rec: Any) -> HighlightQuery:
    if not isinstance(rec, dict):
        raise ValueError("a record must be a JSON object")
    qid, vid, query = rec.get("qid"), rec.get("vid"), _text(rec.get("query"))
    duration = _number(rec.get("duration"))
    if qid is None or not isinstance(vid, str) or query is None:
        raise ValueError("needs 'qid', 'vid' and a non-empty 'query'")
    if duration is None or duration <= 0:
        raise ValueError(f"'duration' must be a positive number, got {rec.get('duration')!r}")
    ids, scores = rec.get("relevant_clip_ids"), rec.get("saliency_scores")
    if not isinstance(ids, list) or not isinstance(scores, list) or len(ids) != len(scores):
        raise ValueError("'relevant_clip_ids' and 'saliency_scores' must be lists of one length")
    n_clips = int(duration / 2)
    for c in ids:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < n_clips:
            raise ValueError(f"clip id {c!r} is not in 0..{n_clips - 1} (duration {duration} s)")
    rows = []
    for s in scores:
        row = [_number(x) for x in s] if isinstance(s, list) else [None]
        if len(row) != 3 or any(x is None for x in row):
            raise ValueError(f"saliency scores must be three numbers per clip, got {s!r}")
        rows.append(tuple(row))
    return HighlightQuery(str(qid), vid, query, duration, tuple(ids), tuple(rows))  # type: ignore[arg-type]


def read_coco_format(path: str | Path) -> list[MomentQuery] | list[CaptionedVideo]:
    """TimeIT/VTG-IT ``*.caption_coco_format.json``: moment retrieval or dense captions,
    told apart by the records' keys (``timestamp`` vs ``segments``)."""
    path = Path(path)
    raw = load_json(path)
    recs = raw.get("annotations") if isinstance(raw, dict) else None
    if not isinstance(recs, list) or not recs:
        raise AnnotationError([f"{path}: expected {{'annotations': [records...]}}"])
    dense = isinstance(recs[0], dict) and "segments" in recs[0]
    split = {"train": 1, "val": 2, "test": 3}.get(path.name.split(".")[0], 1)
    out: list[Any] = []
    bad = _Problems()
    for i, rec in enumerate(recs):
        where = f"{path}: annotations[{i}]"
        if not isinstance(rec, dict) or not isinstance(rec.get("image_id"), str):
            bad.add(where, "needs a string 'image_id'")
            continue
        vid = rec["image_id"].split("/")[-1]  # the original keeps the file name only
        if dense:
            try:
                out.append(_coco_dense(rec, vid, split))
            except ValueError as e:
                bad.add(where, str(e))
            continue
        span, query = _span(rec.get("timestamp")), _text(rec.get("caption"))
        if span is None or query is None or rec.get("id") is None:
            bad.add(where, "needs 'id', a non-empty 'caption' and 'timestamp' [start, end]")
            continue
        out.append(MomentQuery(str(rec["id"]), vid, query, span, _number(rec.get("duration"))))
    bad.raise_if_any()
    return out


def _coco_dense(rec: dict, vid: str, split: int) -> CaptionedVideo:
    if isinstance(rec.get("pure_cap"), str):  # YouCook2
        caps = rec["pure_cap"].split(". ")
    elif isinstance(rec.get("caption"), str):  # ActivityNet
        caps = [c.strip(" ") for c in rec["caption"].split(".") if len(c) > 5]
    else:
        raise ValueError("needs 'pure_cap' or 'caption'")
    segs = rec.get("segments")
    spans = [_span(s) for s in segs] if isinstance(segs, list) else [None]
    if any(s is None for s in spans) or len(spans) != len(caps):
        raise ValueError(f"{len(caps)} captions for segments {segs!r:.80}")
    caps = [c + "." for c in caps]
    return CaptionedVideo(
        vid,
        _number(rec.get("duration")),
        tuple(spans),
        tuple(caps),
        (split,) * len(caps),  # type: ignore[arg-type]
    )


def _dense(vid: str, duration: Any, spans_raw: Any, caps_raw: Any, split: int) -> CaptionedVideo:
    if not isinstance(spans_raw, list) or not isinstance(caps_raw, list) or not spans_raw:
        raise ValueError("needs non-empty lists of timestamps and sentences")
    if len(spans_raw) != len(caps_raw):
        raise ValueError(f"{len(spans_raw)} timestamps but {len(caps_raw)} sentences")
    spans = [_span(s) for s in spans_raw]
    bad = [s for s, v in zip(spans_raw, spans, strict=True) if v is None]
    if bad:
        raise ValueError(f"timestamps must be [start, end] >= 0, got {bad[0]!r}")
    caps = [_text(c) for c in caps_raw]
    if any(c is None for c in caps):
        raise ValueError("sentences must be non-empty strings")
    return CaptionedVideo(
        vid,
        _number(duration),
        tuple(spans),
        tuple(caps),
        (split,) * len(caps),  # type: ignore[arg-type]
    )


def read_youcook2(path: str | Path, subset: str = "validation") -> list[CaptionedVideo]:
    """YouCook2's ``youcookii_annotations_trainval.json``, the videos of *subset*."""
    path = Path(path)
    raw = load_json(path)
    db = raw.get("database") if isinstance(raw, dict) else None
    if not isinstance(db, dict):
        raise AnnotationError([f"{path}: expected {{'database': {{video id: ...}}}}"])
    out, bad = [], _Problems()
    for vid, rec in db.items():
        where = f"{path}: database[{vid!r}]"
        if not isinstance(rec, dict) or not isinstance(rec.get("annotations"), list):
            bad.add(where, "needs an 'annotations' list")
            continue
        if rec.get("subset") != subset:
            continue
        anns = [a for a in rec["annotations"] if isinstance(a, dict)]
        try:
            out.append(
                _dense(
                    vid,
                    rec.get("duration"),
                    [a.get("segment") for a in anns],
                    [a.get("sentence") for a in anns],
                    2,  # the original scores YouCook2's val split as split 2
                )
            )
        except ValueError as e:
            bad.add(where, str(e))
    bad.raise_if_any()
    if not out:
        raise AnnotationError([f"{path}: no video of subset {subset!r}"])
    return out


def read_activitynet(paths: Iterable[str | Path]) -> list[CaptionedVideo]:
    """ActivityNet Captions ``val_1.json`` (and ``val_2.json``): each file is one
    annotation set; a video's sets are merged with their split numbers 1, 2, ..."""
    merged: dict[str, CaptionedVideo] = {}
    bad = _Problems()
    for split, path in enumerate(map(Path, paths), 1):
        raw = load_json(path)
        if not isinstance(raw, dict) or not raw:
            raise AnnotationError([f"{path}: expected {{video id: {{timestamps, sentences}}}}"])
        for vid, rec in raw.items():
            where = f"{path}: [{vid!r}]"
            if not isinstance(rec, dict):
                bad.add(where, "a record must be a JSON object")
                continue
            try:
                cv = _dense(
                    vid, rec.get("duration"), rec.get("timestamps"), rec.get("sentences"), split
                )
            except ValueError as e:
                bad.add(where, str(e))
                continue
            old = merged.get(vid)
            if old is not None:
                cv = CaptionedVideo(
                    vid,
                    old.duration if old.duration is not None else cv.duration,
                    old.segments + cv.segments,
                    old.captions + cv.captions,
                    old.splits + cv.splits,
                )
            merged[vid] = cv
    bad.raise_if_any()
    return list(merged.values())


def activitynet_queries(videos: Iterable[CaptionedVideo]) -> list[MomentQuery]:
    """ActivityNet Captions as moment retrieval: every sentence is a query for its span
    (query id ``VIDEO#k``)."""
    return [
        MomentQuery(f"{v.video}#{k}", v.video, cap, span, v.duration)
        for v in videos
        for k, (span, cap) in enumerate(zip(v.segments, v.captions, strict=True))
    ]
