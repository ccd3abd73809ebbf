"""Generated ids -> predictions, by the original's rules or by the sensible variant.

The original evaluation (``trace/eval/evaluate.py``) turns each generation into three
independent lists -- timestamps (one list per time ``<sync>``), scores (one list per
score ``<sync>``) and captions (one per text ``<sync>``, plus the text left at the end)
-- and ``reformat_tvg.py`` / ``reformat_vhd.py`` / ``reformat_dvc.py`` zip them into
predictions. :func:`release_output` rebuilds those lists from our ids; the ``to_*``
functions apply the reformat scripts. ``rules="lenient"`` uses our event parser
(:mod:`trace_rt.events`) instead. Side by side:

=============================  ===================================  ==============================
situation                      ``original`` (default)               ``lenient``
=============================  ===================================  ==============================
stream ends without text after no result at all (``evaluate.py``    the events parsed so far
the last text ``<sync>``       appends a result only then)
moment / event span            first event with *exactly* two       first event with >= 2
                               timestamps, kept in emitted order    timestamps, first two sorted
                               (a reversed span scores IoU 0)
lists of unequal length        zipped by position (``zip`` stops     events grouped as emitted
                               at the shorter)
highlight clip of time ``t``   ``max(0, int(t/2) - 1)``              ``int(t/2)`` (clip k covers
                                                                    [2k, 2k+2) s)
highlight pairs per event      first timestamp with first score      every (timestamp, score) pair
event with timestamps, no      score 0.0 (the script pads with       skipped
score                          0.0, then fails on ``len(0.0)``)
number ``float()`` rejects     dropped (the original aborts the     dropped
                               whole run with a traceback)
=============================  ===================================  ==============================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trace_rt.config import IdSpace
from trace_rt.events import parse_events
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import DIGIT0, DOT, SEP, SYNC

RULES = ("original", "lenient")
CLIP_SECONDS = 2.0  # QVHighlights' clip length


@dataclass
class ReleaseOutput:
    """The original's per-generation lists (``evaluate.py``'s ``outputs`` dict)."""

    timestamps: list[list[float]] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    kept: bool = True  # False: the original appends no result for this generation
    malformed: int = 0  # numbers float() rejected

    def to_dict(self) -> dict[str, Any]:
        return {
            "timestamps": self.timestamps,
            "scores": self.scores,
            "captions": self.captions,
            "kept": self.kept,
            "malformed": self.malformed,
        }


def _char(local: int) -> str:
    if local == DOT:
        return "."
    return str(local - DIGIT0) if DIGIT0 <= local < DIGIT0 + 10 else ""


class _NumberList:
    def __init__(self, out: ReleaseOutput, target: list[list[float]]) -> None:
        self.out, self.target = out, target
        self.values: list[float] = []
        self.chars: list[str] = []

    def flush(self) -> None:
        if self.chars:
            try:
                self.values.append(float("".join(self.chars)))
            except ValueError:
                self.out.malformed += 1
        self.chars = []

    def feed(self, local: int) -> None:
        if local == SEP:
            self.flush()
        elif local == SYNC:
            self.flush()
            self.target.append(self.values)
            self.values = []
        else:
            self.chars.append(_char(local))


def release_output(token_ids: Iterable[int], tok: TextTokenizer, ids: IdSpace) -> ReleaseOutput:
    """The lists ``evaluate.py`` builds from one generation (its loop over ``output_ids``).

    Text ids (and EOS, which is one) gather into the current caption, closed by text
    ``<sync>``; time/score digits gather into numbers closed by their head's ``<sep>``
    (the number) or ``<sync>`` (the number and the list). After the last id, leftover
    text becomes the last caption and the result is kept; with no leftover text the
    original keeps no result (``kept=False``).
    """
    out = ReleaseOutput()
    times, scores = _NumberList(out, out.timestamps), _NumberList(out, out.scores)
    caption: list[int] = []
    for t in map(int, token_ids):
        if 0 <= t < ids.text_sync:
            caption.append(t)
        elif t == ids.text_sync:
            out.captions.append(tok.decode(caption))
            caption = []
        elif ids.time_base <= t < ids.score_base:
            times.feed(t - ids.time_base)
        elif ids.score_base <= t < ids.size:
            scores.feed(t - ids.score_base)
    if caption:
        out.captions.append(tok.decode(caption))
    out.kept = bool(caption)
    return out


def lenient_events(token_ids: Iterable[int], tok: TextTokenizer, ids: IdSpace) -> list[dict]:
    """Our parser's events (:func:`trace_rt.events.parse_events`) as dicts."""
    return [e.to_dict() for e in parse_events(token_ids, tok, ids)]


def _check(rules: str) -> None:
    if rules not in RULES:
        raise ValueError(f"rules must be one of {RULES}, got {rules!r}")


def to_moment(pred: Mapping[str, Any], rules: str = "original") -> list[float] | None:
    """Moment retrieval (``reformat_tvg.py``): the predicted span, or None.

    *pred* is a predictions.jsonl record (``release`` and ``events``). None means "no
    span" (the original's empty ``{}`` entry); a record the original drops is handled by
    the caller (:func:`is_dropped`).
    """
    _check(rules)
    if rules == "original":
        rel = pred["release"]
        for time, _caption in zip(rel["timestamps"], rel["captions"], strict=False):
            if len(time) == 2:
                return [float(time[0]), float(time[1])]
        return None
    for ev in pred["events"]:
        if len(ev["timestamps"]) >= 2:
            a, b = ev["timestamps"][:2]
            return [min(a, b), max(a, b)]
    return None


def to_clip_scores(
    pred: Mapping[str, Any], duration: float, rules: str = "original"
) -> list[float]:
    """Highlight detection (``reformat_vhd.py``): one score per 2-second clip.

    Clip scores are the mean of the scores that land in the clip, 0 where none does;
    timestamps past *duration* are ignored.
    """
    _check(rules)
    n_clips = int(duration / CLIP_SECONDS)
    total, count = [0.0] * n_clips, [0] * n_clips
    pairs: list[tuple[float, float]] = []
    if rules == "original":
        rel = pred["release"]
        times, scores = rel["timestamps"], rel["scores"]
        if times and scores:
            scores = list(scores[: len(times)]) + [[0.0]] * (len(times) - len(scores))
            pairs = [(t[0], s[0]) for t, s in zip(times, scores, strict=True) if t and s]
    else:
        pairs = [
            (t, s)
            for ev in pred["events"]
            for t, s in zip(ev["timestamps"], ev["scores"], strict=False)
        ]
    for t, s in pairs:
        if t > duration or n_clips == 0:
            continue
        if rules == "original":
            clip = max(0, int(t / CLIP_SECONDS) - 1)
        else:
            clip = min(int(t / CLIP_SECONDS), n_clips - 1)
        total[clip] += s
        count[clip] += 1
    return [tot / c if c else 0.0 for tot, c in zip(total, count, strict=True)]


def to_dense_events(pred: Mapping[str, Any], rules: str = "original") -> list[dict[str, Any]]:
    """Dense captioning (``reformat_dvc.py``): ``[{"timestamp": [s, e], "caption": str}]``."""
    _check(rules)
    if rules == "original":
        rel = pred["release"]
        return [
            {"timestamp": [float(t[0]), float(t[1])], "caption": c}
            for t, c in zip(rel["timestamps"], rel["captions"], strict=False)
            if len(t) == 2
        ]
    out = []
    for ev in pred["events"]:
        if len(ev["timestamps"]) >= 2:
            a, b = ev["timestamps"][:2]
            out.append({"timestamp": [min(a, b), max(a, b)], "caption": ev["caption"]})
    return out


def is_dropped(pred: Mapping[str, Any], rules: str = "original") -> bool:
    """Whether the original keeps no result for this generation (see the table above)."""
    return rules == "original" and not pred["release"]["kept"]


def release_from_original(item: Mapping[str, Any]) -> dict[str, Any]:
    """A record of the original's raw result file (``fmt_*_result.json``: ``video``,
    ``id``, ``timestamps``, ``scores``, ``captions``) in our predictions' shape, so
    ``trace-rt eval score`` applies the same reformat rules to it. The original only
    wrote kept results; its lists hold no events, so ``lenient`` sees the same zipped
    events."""
    times: Sequence = item.get("timestamps") or []
    scores: Sequence = item.get("scores") or []
    caps: Sequence = item.get("captions") or []
    events = []
    for k in range(max(len(times), len(scores), len(caps))):
        events.append(
            {
                "timestamps": list(times[k]) if k < len(times) else [],
                "scores": list(scores[k]) if k < len(scores) else [],
                "caption": caps[k] if k < len(caps) else "",
            }
        )
    rel = {"timestamps": times, "scores": scores, "captions": caps, "kept": True, "malformed": 0}
    return {"release": rel, "events": events}
