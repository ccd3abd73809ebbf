"""Parse a generated id stream into events (timestamps, scores, caption).

Stream layout (trace-model.md, "The output")::

    time … time <sync>(32001) | score … score <sync>(32014) | text … text <sync>(32000) | …

Numbers in the time and score segments are separated by their head's ``<sep>``; EOS
ends the stream. The release's parser keeps three independent lists that misalign as
soon as one segment is missing; this one groups tokens into events and is robust to
streams the decoding loop cannot produce:

* Every id is routed by its head (the id range it falls in), whatever segment the
  event is in: a text id inside the time segment joins the caption, a score id inside
  the time segment joins the scores.
* An event ends at text ``<sync>``, at EOS (which also ends the stream: later ids are
  ignored) and at the end of the stream. A time id arriving after the event's time
  segment was closed by time ``<sync>`` starts a new event (the decoding loop only
  returns to the time head after text ``<sync>``).
* A number is closed by ``<sep>`` or ``<sync>`` of its head. Strings ``float()``
  rejects (such as ``"00.1.2"`` or ``"."``) are dropped; empty ones (stray ``<sep>``)
  add nothing; others are accepted even in an unexpected shape (``"12"`` → 12.0).
* A number still open when its event ends (a stream cut by the token budget) is kept
  only if it has its format's full width (``dddd.d``, ``d.d``): a cut-off ``"002"`` of
  ``"0020.0"`` would read as a wrong value. The rest of the partial event is kept.
* Ids outside the id space (negative or ≥ ``ids.size``) are ignored.
* Events with no timestamp, no score and an empty caption are dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trace_rt.config import IdSpace
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import (
    DIGIT0,
    DOT,
    SEP,
    SYNC,
    TIME_TOKENS_PER_STAMP,
    Head,
    format_score,
    head_of,
)

_SCORE_WIDTH = len(format_score(0.0))


@dataclass
class Event:
    """One event: its timestamps (s), salience scores and caption."""

    timestamps: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    caption: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "timestamps": list(self.timestamps),
            "scores": list(self.scores),
            "caption": self.caption,
        }


def _char(local_id: int) -> str:
    if local_id == DOT:
        return "."
    if DIGIT0 <= local_id < DIGIT0 + 10:
        return str(local_id - DIGIT0)
    return ""  # an id of a larger vocabulary than the format's 13 tokens: no character


class _Numbers:
    """The numbers of one head within an event."""

    def __init__(self, width: int) -> None:
        self.width = width  # characters of a well-formed number
        self.values: list[float] = []
        self.chars: list[str] = []
        self.closed = False  # the head's <sync> was seen

    def feed(self, local_id: int) -> None:
        if local_id in (SEP, SYNC):
            self.flush()
            self.closed = self.closed or local_id == SYNC
        else:
            self.chars.append(_char(local_id))

    def flush(self, *, complete_only: bool = False) -> None:
        text = "".join(self.chars)
        self.chars = []
        if text and (len(text) == self.width or not complete_only):
            with contextlib.suppress(ValueError):  # malformed ("00.1.2", "."): dropped
                self.values.append(float(text))


class _EventBuilder:
    def __init__(self) -> None:
        self.times = _Numbers(TIME_TOKENS_PER_STAMP)
        self.scores = _Numbers(_SCORE_WIDTH)
        self.text: list[int] = []

    def finish(self, tok: TextTokenizer) -> Event | None:
        self.times.flush(complete_only=True)
        self.scores.flush(complete_only=True)
        ev = Event(self.times.values, self.scores.values, tok.decode(self.text).strip())
        return ev if ev.timestamps or ev.scores or ev.caption else None


class EventParser:
    """The module's rules, one id at a time: :meth:`feed` returns each event as soon as
    it is complete, so a server can stream events while decoding goes on.

    ``[*p.feed(t) for t in ids] + p.finish()`` is exactly :func:`parse_events` of *ids*.
    """

    def __init__(self, tok: TextTokenizer, ids: IdSpace) -> None:
        self.tok = tok
        self.ids = ids
        self.done = False  # EOS seen: later ids are ignored
        self._cur = _EventBuilder()

    def _close(self) -> list[Event]:
        ev = self._cur.finish(self.tok)
        self._cur = _EventBuilder()
        return [ev] if ev is not None else []

    def feed(self, token_id: int) -> list[Event]:
        """Take one generated id; returns the events it completed (zero or one)."""
        t = int(token_id)
        ids = self.ids
        if self.done or not 0 <= t < ids.size:
            return []
        head = head_of(ids, t)
        if head is Head.TEXT:
            if t == ids.text_sync:
                return self._close()
            if t == self.tok.eos_id:
                self.done = True
                return self._close()
            self._cur.text.append(t)
            return []
        if head is Head.TIME:
            closed = self._close() if self._cur.times.closed else []
            self._cur.times.feed(t - ids.time_base)
            return closed
        self._cur.scores.feed(t - ids.score_base)
        return []

    def finish(self) -> list[Event]:
        """End of the stream: the event still open, if it holds anything."""
        if self.done:
            return []
        self.done = True
        return self._close()


def parse_events(token_ids: Iterable[int], tok: TextTokenizer, ids: IdSpace) -> list[Event]:
    """Events of a generated stream (the ids after the prompt), per the module rules."""
    parser = EventParser(tok, ids)
    events = [ev for t in token_ids for ev in parser.feed(t)]
    return events + parser.finish()


def first_span(events: Sequence[Event]) -> tuple[float, float] | None:
    """Moment retrieval's answer: the first two timestamps, sorted, of the first event
    that has two (the release takes the first event with a two-timestamp list)."""
    for ev in events:
        if len(ev.timestamps) >= 2:
            a, b = ev.timestamps[:2]
            return (min(a, b), max(a, b))
    return None


def highlights(events: Sequence[Event]) -> list[tuple[float, float]]:
    """Highlight detection's answer: (timestamp, score) pairs, zipped within each event.

    Events lacking timestamps or scores contribute nothing (the release pairs only the
    first timestamp with the first score of each event; extra pairs are kept here).
    """
    return [(t, s) for ev in events for t, s in zip(ev.timestamps, ev.scores, strict=False)]
