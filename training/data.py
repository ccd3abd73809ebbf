"""The training-sample format: one JSON file per split, validated with sample ids.

A split file (``train.json``, ``val.json``) is::

    {"format": "trace-rt-train/1",
     "samples": [
       {"id": "v0007-mr-0",                   # unique; every error message names it
        "video": "videos/v0007.mp4",          # relative to the split file's directory
        "task": "mr",                         # dvc | mr | vhd | custom
        "query": "a red circle moves left",   # mr and vhd only
        "question": null,                     # custom only: the free question
        "events": [                           # the answer, in the structure TRACE emits
          {"timestamps": [1.5, 4.0], "scores": [], "caption": ""}],
        "frame_words": [[1.5, 4.0, "red"]]},  # optional: words that may stand in for frames
       ...]}

The user turn is not stored: it is the runtime's prompt (``trace_rt.prompts``: the
template's system text, ``<video>\\n`` + the task's question with the query), so training
and serving cannot drift apart. The assistant turn is ``events``: per event its
timestamps (seconds, emitted by the time head), its scores (the score head) and its
caption (the text head); an event may leave any of them empty, as moment retrieval leaves
the caption. ``duration`` (seconds) may be given; timestamps are checked against the
decoded video either way.

``frame_words`` (optional) are timed words, ``[start, end, word]``: what a sampled frame at
time t shows, for every span with start <= t < end. A recipe's ``frame_words`` share
trains on them in place of the frames' pixels (:mod:`training.dataset`): a curriculum in
which the LLM learns to look up the query in a video block whose content it can already
read (issue 14's synthetic hard case), before the projector learns to feed it.

Problems found before training (unknown task, missing query, malformed events, duplicate
ids) and while reading videos (missing or undecodable file, timestamps beyond the end)
raise :class:`BadSampleError` naming the sample, or, with ``on_bad_sample="skip"``, are
reported as warnings and the sample is dropped. Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_rt.prompts import CUSTOM_TASK, QUERY_TASKS, TASKS
from trace_rt.tokens import MAX_TIMESTAMP
from training.render import Turns

FORMAT = "trace-rt-train/1"
ON_BAD = ("fail", "skip")
MAX_SCORE = 9.9  # the score format d.d
log = logging.getLogger("training.data")


class BadSampleError(ValueError):
    """A training sample is unusable; the message starts with its id."""

    def __init__(self, sample_id: str, problem: str):
        super().__init__(f"sample {sample_id!r}: {problem}")
        self.sample_id = sample_id
        self.problem = problem


@dataclass(frozen=True)
class EventTarget:
    """One target event: timestamps (s), scores and caption."""

    timestamps: tuple[float, ...] = ()
    scores: tuple[float, ...] = ()
    caption: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "timestamps": list(self.timestamps),
            "scores": list(self.scores),
            "caption": self.caption,
        }


@dataclass(frozen=True)
class Sample:
    id: str
    video: Path  # absolute
    task: str
    events: tuple[EventTarget, ...]
    query: str | None = None
    question: str | None = None
    duration: float | None = None
    turns: Turns | None = None  # the release's own conversation (training.release_data)
    image: Path | None = None  # an image sample of the release's JSON (no video)
    frame_words: tuple[tuple[float, float, str], ...] | None = None  # [start, end, word]

    def to_dict(self, root: Path | None = None) -> dict[str, Any]:
        video = self.video.resolve()  # relative to root, not to the cwd it was made in
        if root is not None:
            with contextlib.suppress(ValueError):  # outside root: keep it absolute
                video = video.relative_to(root)
        d: dict[str, Any] = {"id": self.id, "video": video.as_posix(), "task": self.task}
        if self.query is not None:
            d["query"] = self.query
        if self.question is not None:
            d["question"] = self.question
        if self.duration is not None:
            d["duration"] = self.duration
        d["events"] = [e.to_dict() for e in self.events]
        if self.frame_words is not None:
            d["frame_words"] = [list(w) for w in self.frame_words]
        return d


def report_bad(err: BadSampleError, on_bad: str) -> None:
    """Raise *err* (``fail``) or log it as a skipped sample (``skip``)."""
    if on_bad == "fail":
        raise err
    log.warning("skipping %s", err)


def _number_list(sid: str, raw: Any, what: str, hi: float) -> tuple[float, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BadSampleError(sid, f"{what} must be a list of numbers, got {raw!r}")
    out = []
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BadSampleError(sid, f"{what} holds a non-number {v!r}")
        if not 0 <= v <= hi:
            raise BadSampleError(sid, f"{what} value {v} is outside 0..{hi}")
        out.append(float(v))
    return tuple(out)


def _event(sid: str, raw: Any, k: int) -> EventTarget:
    if not isinstance(raw, dict):
        raise BadSampleError(sid, f"event {k} must be an object, got {raw!r}")
    unknown = set(raw) - {"timestamps", "scores", "caption"}
    if unknown:
        raise BadSampleError(sid, f"event {k} has unknown keys {sorted(unknown)}")
    caption = raw.get("caption", "") or ""
    if not isinstance(caption, str) or "<sync>" in caption or "<video>" in caption:
        raise BadSampleError(sid, f"event {k} caption must be a string without placeholders")
    ev = EventTarget(
        _number_list(sid, raw.get("timestamps"), f"event {k} timestamps", MAX_TIMESTAMP),
        _number_list(sid, raw.get("scores"), f"event {k} scores", MAX_SCORE),
        caption.strip(),
    )
    if not (ev.timestamps or ev.scores or ev.caption):
        raise BadSampleError(sid, f"event {k} is empty (no timestamps, scores or caption)")
    return ev


def _frame_words(sid: str, raw: Any) -> tuple[tuple[float, float, str], ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadSampleError(sid, f"'frame_words' must be a list of [start, end, word]: {raw!r}")
    out = []
    for k, item in enumerate(raw):
        shaped = isinstance(item, list) and len(item) == 3 and isinstance(item[2], str)
        span = _number_list(sid, item[:2], f"frame_words {k} span", MAX_TIMESTAMP) if shaped else ()
        if not (span and span[0] < span[1] and item[2].strip()):
            raise BadSampleError(
                sid, f"frame_words {k} must be [start, end, word] with start < end, got {item!r}"
            )
        out.append((span[0], span[1], item[2].strip()))
    return tuple(out)


def parse_sample(raw: Any, root: Path, index: int) -> Sample:
    """Validate one sample object (everything that needs no video)."""
    sid = raw.get("id") if isinstance(raw, dict) else None
    sid = str(sid) if sid is not None else f"#{index}"
    if not isinstance(raw, dict):
        raise BadSampleError(sid, "a sample must be a JSON object")
    video, task = raw.get("video"), raw.get("task")
    if not isinstance(video, str) or not video:
        raise BadSampleError(sid, "missing 'video' path")
    if task not in (*TASKS, CUSTOM_TASK):
        raise BadSampleError(sid, f"unknown task {task!r}; use one of {[*TASKS, CUSTOM_TASK]}")
    query, question = raw.get("query"), raw.get("question")
    if task in QUERY_TASKS and (not isinstance(query, str) or not query.strip()):
        raise BadSampleError(sid, f"task {task!r} needs a non-empty 'query'")
    if task not in QUERY_TASKS and query is not None:
        raise BadSampleError(sid, f"task {task!r} takes no 'query'")
    if task == CUSTOM_TASK and (not isinstance(question, str) or not question.strip()):
        raise BadSampleError(sid, "task 'custom' needs a non-empty 'question'")
    events = raw.get("events")
    if not isinstance(events, list) or not events:
        raise BadSampleError(sid, "'events' must be a non-empty list")
    evs = tuple(_event(sid, e, k) for k, e in enumerate(events))
    if task == "mr" and len(evs[0].timestamps) != 2:
        raise BadSampleError(sid, "a moment-retrieval target needs exactly 2 timestamps")
    duration = raw.get("duration")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0
    ):
        raise BadSampleError(sid, f"'duration' must be a positive number, got {duration!r}")
    return Sample(
        id=sid,
        video=(root / video).resolve(),
        task=task,
        events=evs,
        query=query,
        question=question if task == CUSTOM_TASK else None,
        duration=float(duration) if duration is not None else None,
        frame_words=_frame_words(sid, raw.get("frame_words")),
    )


def load_split(
    path: str | Path, on_bad: str = "fail", data_folder: str | Path | None = None
) -> list[Sample]:
    """Read and validate a split file (or ``DIR/train.json`` when given a directory).

    A file in the release's own layout (a list of records with ``conversations``) is
    read by :func:`training.release_data.parse_release`, its paths relative to
    *data_folder* (default: the file's directory).
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD}, got {on_bad!r}")
    path = Path(path)
    if path.is_dir():
        path = path / "train.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no training split file {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    from training.release_data import is_release_json, parse_release

    if is_release_json(raw):
        return parse_release(raw, path, data_folder, on_bad)
    if isinstance(raw, dict) and raw.get("format") not in (None, FORMAT):
        raise ValueError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}")
    items = raw.get("samples") if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected {{'samples': [...]}} or a list of samples")
    return collect_samples(items, lambda item, i: parse_sample(item, path.parent, i), on_bad, path)


def collect_samples(
    items: list[Any], parse: Callable[[Any, int], Sample], on_bad: str, path: Path
) -> list[Sample]:
    """*parse* of each item (with its index), bad ones and repeated ids reported per
    *on_bad* and skipped.

    Raises:
        ValueError: no item gave a usable sample.
    """
    samples, seen = [], set()
    for i, item in enumerate(items):
        try:
            s = parse(item, i)
            if s.id in seen:
                raise BadSampleError(s.id, "duplicate id")
        except BadSampleError as e:
            report_bad(e, on_bad)
            continue
        seen.add(s.id)
        samples.append(s)
    if not samples:
        raise ValueError(f"{path}: no usable samples")
    return samples


def check_against_video(sample: Sample, duration: float) -> None:
    """Timestamps must lie within the decoded video (one frame of slack is the caller's)."""
    for k, ev in enumerate(sample.events):
        late = [t for t in ev.timestamps if t > duration]
        if late:
            raise BadSampleError(
                sample.id,
                f"event {k} timestamps {late} lie beyond the video's end ({duration:.2f} s)",
            )


def write_split(path: str | Path, samples: Iterable[Sample], root: Path | None = None) -> Path:
    path = Path(path)
    root = root if root is not None else path.parent
    doc = {"format": FORMAT, "samples": [s.to_dict(root.resolve()) for s in samples]}
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path
