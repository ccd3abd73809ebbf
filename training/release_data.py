"""A reader for the release's training JSON (VTG-IT / TimeIT style, ``stage-1.json``).

The release trains on a JSON list of records::

    {"video": "activitynet/v_xyz.mp4",          # or "image": "...", relative to --data-folder
     "conversations": [
        {"from": "human", "value": "<video>\\nLocalize the visual content ..."},
        {"from": "gpt", "value": "<sync><time><time>...<score><sync>..."}],
     "times": [[12.3, 18.0], ...],                # per event, its timestamps (seconds)
     "scores": [[], ...]}                         # per event, its scores

Each ``<time>``/``<score>`` in the answer stands for one token of the encoded ``times`` /
``scores`` (``dddd.d`` / ``d.d`` values joined by ``<sep>``, closed by ``<sync>``); the
counts must agree (checked when the data set is built, naming the sample). The turns are
kept verbatim and rendered as the release renders them (:mod:`training.render`), with
the release's own preprocessing: ``<video>``/``<image>`` moved to the start of its turn
followed by a newline, a leading assistant turn dropped.

Image records become samples whose one image is repeated as every frame at time 0 (as
the release does). Text-only records (no ``video``/``image``) and several rounds of
conversation are refused with a clear reason: the release's model needs exactly one
visual input per sample (``prepare_inputs_labels_for_multimodal`` asserts it). Records
have no ids: a record's id is its ``id`` field if present, else ``<file>#<index>``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trace_rt.prompts import CUSTOM_TASK
from trace_rt.tokens import MAX_TIMESTAMP
from training.data import MAX_SCORE, BadSampleError, EventTarget, Sample, collect_samples
from training.render import IMAGE, VIDEO, Turns


def is_release_json(raw: Any) -> bool:
    """A top-level list of records with ``conversations``: the release's layout."""
    return (
        isinstance(raw, list)
        and bool(raw)
        and isinstance(raw[0], dict)
        and ("conversations" in raw[0])
    )


def _values(sid: str, raw: Any, what: str, hi: float) -> tuple[tuple[float, ...], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(ev, list) for ev in raw):
        raise BadSampleError(sid, f"'{what}' must be a list of lists of numbers, got {raw!r}")
    out = []
    for ev in raw:
        for v in ev:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadSampleError(sid, f"'{what}' holds a non-number {v!r}")
            if not 0 <= v <= hi:
                raise BadSampleError(sid, f"'{what}' value {v} is outside 0..{hi}")
        out.append(tuple(float(v) for v in ev))
    return tuple(out)


def _move_visual_first(text: str) -> str:
    """The release's ``preprocess_multimodal``: ``<video>`` to the front, then a newline."""
    for token in (IMAGE, VIDEO):
        if token in text:
            text = (token + "\n" + text.replace(token, "").strip()).strip()
    return text


def _turns(sid: str, convs: Any) -> tuple[str, str]:
    if not isinstance(convs, list) or not all(isinstance(c, dict) for c in convs):
        raise BadSampleError(sid, "'conversations' must be a list of {from, value} objects")
    if convs and convs[0].get("from") != "human":
        convs = convs[1:]  # the release skips a first turn that is not the user's
    roles = [c.get("from") for c in convs]
    if roles != ["human", "gpt"]:
        raise BadSampleError(
            sid, f"expected one human turn then one gpt turn, got {roles} (multi-round "
            "conversations are not supported)"
        )  # fmt: skip
    values = [c.get("value") for c in convs]
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise BadSampleError(sid, "every turn needs a non-empty string 'value'")
    return _move_visual_first(values[0]), _move_visual_first(values[1])


def parse_record(raw: Any, folder: Path, index: int, name: str) -> Sample:
    """One release record -> :class:`Sample` carrying its :class:`Turns`."""
    if not isinstance(raw, dict):
        raise BadSampleError(f"{name}#{index}", "a record must be a JSON object")
    sid = str(raw["id"]) if raw.get("id") is not None else f"{name}#{index}"
    human, answer = _turns(sid, raw.get("conversations"))
    times = _values(sid, raw.get("times"), "times", MAX_TIMESTAMP)
    scores = _values(sid, raw.get("scores"), "scores", MAX_SCORE)
    video, image = raw.get("video"), raw.get("image")
    if not video and not image:
        raise BadSampleError(
            sid, "text-only records are not supported: the release's model needs one video "
            "or image per sample"
        )  # fmt: skip
    path = video or image
    if not isinstance(path, str):
        raise BadSampleError(sid, f"'video'/'image' must be a path string, got {path!r}")
    token = VIDEO if video else IMAGE
    if human.count(token) != 1:
        raise BadSampleError(sid, f"the human turn must hold {token} exactly once")
    resolved = (folder / path).resolve()
    return Sample(
        id=sid,
        video=resolved,
        task=CUSTOM_TASK,
        events=tuple(EventTarget(timestamps=t) for t in times if t),
        turns=Turns(human, answer, times, scores),
        image=None if video else resolved,
    )


def load_release_json(
    path: str | Path, data_folder: str | Path | None = None, on_bad: str = "fail"
) -> list[Sample]:
    """Read a release training JSON; paths are relative to *data_folder* (the release's
    ``--data_folder``; default: the JSON file's directory)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no training data file {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return parse_release(raw, path, data_folder, on_bad)


def parse_release(
    raw: Any, path: Path, data_folder: str | Path | None, on_bad: str = "fail"
) -> list[Sample]:
    if not is_release_json(raw):
        raise ValueError(f"{path}: expected a list of records with 'conversations'")
    folder = Path(data_folder) if data_folder is not None else path.parent
    return collect_samples(
        raw, lambda item, i: parse_record(item, folder, i, path.name), on_bad, path
    )
