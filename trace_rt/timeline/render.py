"""One self-contained HTML page per answer: the frames on a time axis, the events on it.

The page needs nothing from the network: CSS and JavaScript are inline, thumbnails are
``data:`` JPEGs, and a Content-Security-Policy forbids every other source (a page that
tried to load a font or a script from a CDN would be blocked, not just slow). Every
string that came from a user or the model (query, captions, file names) is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

TASK_TITLES = {
    "dvc": "Dense video captioning",
    "mr": "Moment retrieval",
    "vhd": "Highlight detection",
    "custom": "Question",
}
# No source but the page itself: inline style and script, data: images, and media only
# from the page's own origin, a local file or a data: URI (never http(s) elsewhere).
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "img-src data:; media-src 'self' file: data:"
)
_NICE_STEPS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)


@dataclass(frozen=True)
class Span:
    """One event placed on the axis."""

    index: int
    start: float | None  # None: the event has no timestamp
    end: float | None
    caption: str
    scores: tuple[float, ...]
    row: int = 0


@dataclass
class Page:
    """What one timeline page shows.

    Args:
        result: a ``trace-rt run`` result (``events``, ``frame_times``, ``duration``, ...).
        request: what was asked: task, query or question, frames, model, backend.
        thumbnails: one JPEG per sampled frame (same order as ``frame_times``), or none.
        video_src: the player's source (a path relative to the page, or a ``data:`` URI).
        ground_truth: for evaluation pages, the reference segments ``(start, end,
            caption)``, drawn on a track of their own.
        gt_iou: the evaluation's score of the prediction against the reference (moment
            retrieval: its IoU, by the benchmark's rules), shown beside it.
    """

    result: Mapping[str, Any]
    request: Mapping[str, Any] = field(default_factory=dict)
    thumbnails: Sequence[bytes] = ()
    video_src: str | None = None
    ground_truth: Sequence[tuple[float, float, str]] = ()
    gt_iou: float | None = None


def esc(value: object) -> str:
    """Text (or an attribute value) safe to put in HTML."""
    return html.escape(str(value), quote=True)


def script_json(value: object) -> str:
    """JSON that can sit inside ``<script>`` (no ``</script>`` or ``<!--`` breakout)."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def asset(name: str) -> str:
    return resources.files("trace_rt.timeline").joinpath(name).read_text(encoding="utf-8")


def fmt_time(t: float) -> str:
    """``75.25`` -> ``1:15.3``; under a minute ``12.3 s``."""
    if t < 60:
        return f"{t:.1f} s"
    m, s = divmod(t, 60)
    return f"{int(m)}:{s:04.1f}"


def tick_step(duration: float, target: int = 10) -> float:
    """The smallest "nice" step giving at most ~``target`` ticks over ``duration``."""
    for step in _NICE_STEPS:
        if duration / step <= target:
            return step
    return math.ceil(duration / target / 3600) * 3600.0


def spans(events: Sequence[Mapping[str, Any]]) -> list[Span]:
    """Events as spans, packed into rows so that overlapping spans do not cover each other
    (greedy: each span goes to the first row whose last span ended before it starts)."""
    out: list[Span] = []
    row_ends: list[float] = []
    for i, ev in enumerate(events):
        ts = [float(t) for t in ev.get("timestamps", [])]
        scores = tuple(float(s) for s in ev.get("scores", []))
        caption = str(ev.get("caption", ""))
        if not ts:
            out.append(Span(i, None, None, caption, scores))
            continue
        start, end = ts[0], ts[-1]  # the span its timestamps cover, as generated
        lo = min(start, end)
        row = next((r for r, e in enumerate(row_ends) if e <= lo), len(row_ends))
        if row == len(row_ends):
            row_ends.append(0.0)
        row_ends[row] = max(start, end)
        out.append(Span(i, start, end, caption, scores, row))
    return out


def salience(events: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """(time, score) points for highlight detection, sorted by time: each timestamp with
    the score at the same position in its event (the event's last score when it has
    fewer scores than timestamps, as the release's vhd output pairs them)."""
    points = []
    for ev in events:
        scores = [float(s) for s in ev.get("scores", [])]
        for k, t in enumerate(ev.get("timestamps", [])):
            if scores:
                points.append((float(t), scores[min(k, len(scores) - 1)]))
    return sorted(points)


class _Axis:
    """Maps seconds to percent of the timeline's width."""

    def __init__(self, result: Mapping[str, Any], events: Sequence[Span], gt: Sequence):
        ends = [float(result.get("duration") or 0.0)]
        ends += [max(s.start, s.end) for s in events if s.start is not None]
        ends += list(result.get("frame_times", [])) + [max(s, e) for s, e, _ in gt]
        self.length = max(max(ends), 1e-3)

    def pct(self, t: float) -> float:
        return round(100.0 * min(max(t, 0.0), self.length) / self.length, 3)

    def place(self, start: float, end: float) -> str:
        lo, hi = min(start, end), max(start, end)
        return f"left:{self.pct(lo)}%;width:{max(self.pct(hi) - self.pct(lo), 0.4)}%"


def _request_table(page: Page) -> str:
    r, q = page.result, page.request
    rows = [
        ("task", q.get("task", r.get("task"))),
        ("query", q.get("query")),
        ("question", q.get("question")),
        ("video", r.get("video")),
        ("duration", fmt_time(float(r.get("duration", 0.0)))),
        ("frames", r.get("frames", len(r.get("frame_times", [])))),
        ("model", q.get("model")),
        ("backend", q.get("backend")),
        ("stop reason", r.get("stop_reason")),
        ("events", len(r.get("events", []))),
    ]
    body = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows if v not in (None, "")
    )
    timing = r.get("timing_ms") or {}
    if timing:
        body += "<tr><th>timings</th><td>" + ", ".join(
            f"{esc(k)} {float(v):,.0f} ms" for k, v in timing.items()
        )
        body += "</td></tr>"
    return f'<table class="request">{body}</table>'


def _axis_ticks(axis: _Axis) -> str:
    step = tick_step(axis.length)
    ticks = [k * step for k in range(int(axis.length / step + 1e-9) + 1)]
    return "".join(
        f'<span class="tick" style="left:{axis.pct(t)}%">{esc(fmt_time(t))}</span>' for t in ticks
    )


def _filmstrip(page: Page, axis: _Axis) -> str:
    times = [float(t) for t in page.result.get("frame_times", [])]
    marks = "".join(
        f'<span class="frame-mark" data-time="{t:.3f}" style="left:{axis.pct(t)}%" '
        f'title="frame {i} at {esc(fmt_time(t))}"></span>'
        for i, t in enumerate(times)
    )
    thumbs = "".join(
        f'<img class="thumb" data-time="{t:.3f}" alt="frame {i} at {esc(fmt_time(t))}" '
        f'style="left:{axis.pct(t)}%" src="data:image/jpeg;base64,'
        f'{base64.b64encode(jpeg).decode()}">'
        for i, (t, jpeg) in enumerate(zip(times, page.thumbnails, strict=False))
    )
    n = max(len(page.thumbnails), 1)
    return f'<div class="strip" style="--n:{n}">{thumbs}</div><div class="marks">{marks}</div>'


def _event_element(s: Span, axis: _Axis, task: str) -> str:
    label = s.caption or (f"score {s.scores[0]:.1f}" if s.scores else "")
    if s.start is None:
        return (
            f'<button class="event untimed" data-index="{s.index}" data-start="" data-end="">'
            f'<span class="caption">{esc(s.caption)}</span></button>'
        )
    score = f' data-score="{s.scores[0]:.1f}"' if s.scores else ""
    title = f"{fmt_time(s.start)} – {fmt_time(s.end)}" + (f": {s.caption}" if s.caption else "")
    return (
        f'<button class="event {esc(task)}" data-index="{s.index}" data-start="{s.start:.3f}" '
        f'data-end="{s.end:.3f}"{score} style="{axis.place(s.start, s.end)};--row:{s.row}" '
        f'title="{esc(title)}"><span class="caption">{esc(label)}</span></button>'
    )


def _salience_svg(points: list[tuple[float, float]], axis: _Axis) -> str:
    if not points:
        return ""
    top = max(5.0, max(s for _, s in points))
    xy = " ".join(f"{axis.pct(t):.3f},{100 - 100 * s / top:.2f}" for t, s in points)
    # Zero-length round-capped lines: dots that stay round in the stretched viewBox.
    dots = "".join(
        f'<line class="point" x1="{axis.pct(t):.3f}" x2="{axis.pct(t):.3f}" '
        f'y1="{100 - 100 * s / top:.2f}" y2="{100 - 100 * s / top:.2f}">'
        f"<title>{esc(fmt_time(t))}: {s:.1f}</title></line>"
        for t, s in points
    )
    return (
        '<svg class="salience" viewBox="0 0 100 100" preserveAspectRatio="none" '
        f'role="img" aria-label="salience over time (max {top:.1f})">'
        f'<polyline points="{xy}"/>{dots}</svg><span class="y-label">salience (max '
        f"{top:.1f})</span>"
    )


def _ground_truth(page: Page, axis: _Axis) -> str:
    if not page.ground_truth:
        return ""
    label = "" if page.gt_iou is None else f" · IoU {page.gt_iou:.2f}"
    segs = "".join(
        f'<div class="gt" data-start="{s:.3f}" data-end="{e:.3f}" style="{axis.place(s, e)}" '
        f'title="{esc(fmt_time(s))} – {esc(fmt_time(e))}"><span class="caption">'
        f"{esc(cap or 'ground truth')}{label if k == 0 else ''}</span></div>"
        for k, (s, e, cap) in enumerate(page.ground_truth)
    )
    iou = "" if page.gt_iou is None else f' data-iou="{page.gt_iou:.3f}"'
    return f'<div class="gt-track"{iou}><span class="track-label">ground truth</span>{segs}</div>'


def _event_list(items: list[Span]) -> str:
    rows = "".join(
        f'<tr class="event-row" data-index="{s.index}" data-start="'
        f'{"" if s.start is None else f"{s.start:.3f}"}"><td>{s.index}</td>'
        f"<td>{'' if s.start is None else esc(fmt_time(s.start))}</td>"
        f"<td>{'' if s.end is None else esc(fmt_time(s.end))}</td>"
        f"<td>{esc(', '.join(f'{x:.1f}' for x in s.scores))}</td><td>{esc(s.caption)}</td></tr>"
        for s in items
    )
    return (
        '<table class="events"><thead><tr><th>#</th><th>start</th><th>end</th><th>score</th>'
        f"<th>caption</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def render(page: Page, title: str | None = None) -> str:
    """The page's HTML text."""
    result = page.result
    task = str(page.request.get("task") or result.get("task") or "")
    events = list(result.get("events", []))
    items = spans(events)
    axis = _Axis(result, items, page.ground_truth)
    rows = max([s.row for s in items if s.start is not None], default=0) + 1
    track = "".join(_event_element(s, axis, task) for s in items)
    if task == "vhd":
        track = _salience_svg(salience(events), axis) + track
    player = (
        f'<video id="player" controls preload="metadata" src="{esc(page.video_src)}"></video>'
        if page.video_src
        else '<p class="note">No player: put the video next to this page and pass '
        "<code>--report</code> again, or use <code>--embed-video</code>.</p>"
    )
    data = {
        "task": task,
        "duration": axis.length,
        "events": [{"index": s.index, "start": s.start, "end": s.end} for s in items],
        "frame_times": list(result.get("frame_times", [])),
    }
    heading = title or f"TRACE · {TASK_TITLES.get(task, task or 'answer')}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(heading)}</title><style>{asset("timeline.css")}</style></head>
<body><header><h1>{esc(heading)}</h1>{_request_table(page)}</header>
<main><section class="timeline" aria-label="timeline">
<div class="axis">{_axis_ticks(axis)}</div>{_filmstrip(page, axis)}
<div class="track {esc(task)}" style="--rows:{rows}">{track}<div class="cursor" hidden></div></div>
{_ground_truth(page, axis)}</section>
<section class="player">{player}</section>
<section class="list">{_event_list(items)}</section></main>
<script type="application/json" id="trace-data">{script_json(data)}</script>
<script>{asset("timeline.js")}</script></body></html>
"""
