"""``report.html`` of ``trace-rt eval``: the metrics beside the release's, how the
per-item scores are distributed, and the best and worst items with their timelines.

Each item is scored by the evaluation's own code and rules (``trace_rt.evaluation``):
moment retrieval by its IoU (the benchmark's rule, e.g. a reversed span scores 0),
highlights by the query's mAP at the ``VeryGood`` level, dense captioning by the video's
localisation F1. The best and worst N items (and with ``pages="all"`` every item) get a
timeline page of their own under ``items/``, linked from the report.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_rt.evaluation import reformat as rf
from trace_rt.evaluation.benchmarks import PUBLISHED
from trace_rt.evaluation.dense import dense_metrics
from trace_rt.evaluation.metrics import gt_clip_scores, highlight_metrics, iou_original, iou_sorted
from trace_rt.evaluation.report import NOTES, fmt_metric, headline
from trace_rt.timeline.render import CSP, asset, esc

SCORE_NAMES = {"mr": "IoU", "vhd": "mAP (VeryGood)", "dvc": "F1", "qa": "correct"}
PAGES = ("best-worst", "all", "none")


@dataclass(frozen=True)
class Scored:
    """One annotated item with its prediction (if any) and its score in [0, 1]."""

    key: str
    video: str
    query: str | None
    score: float
    record: Mapping[str, Any] | None
    truth: tuple[tuple[float, float, str], ...]  # reference segments
    pred: tuple[tuple[float, float], ...]  # predicted segments, as the rules read them
    duration: float


def _item_key(task: str, item: Any) -> str:
    return item.qid if task in ("mr", "vhd", "qa") else item.video


def score_items(
    task: str,
    items: Sequence[Any],
    records: Mapping[str, Any],
    rules: str,
    benchmark: str = "",
) -> list[Scored]:
    """Every annotated item scored as the benchmark's metric scores it (0 without a
    prediction, or when the rules drop the generation)."""
    from trace_rt.evaluation.videos import strip_video_ext

    by_stem = {strip_video_ext(k): r for k, r in records.items()}
    out = []
    for it in items:
        key = _item_key(task, it)
        rec = records.get(key) if task != "dvc" else by_stem.get(strip_video_ext(key))
        usable = rec is not None and not rf.is_dropped(rec, rules)
        dur = float((rec or {}).get("duration") or getattr(it, "duration", None) or 0.0)
        score, truth, pred = 0.0, (), ()
        if task == "qa":
            from trace_rt.evaluation import videoqa as vqa

            score = float(
                rec is not None and vqa.is_correct(benchmark, it, vqa.prediction_text(rec))
            )
        elif task == "mr":
            truth = ((float(it.span[0]), float(it.span[1]), ""),)
            span = rf.to_moment(rec, rules) if usable else None
            if span:
                pred = ((float(span[0]), float(span[1])),)
                score = (iou_sorted if rules == "lenient" else iou_original)(it.span, span)
        elif task == "vhd":
            truth = tuple((2.0 * c, 2.0 * c + 2.0, "") for c in it.relevant_clip_ids)
            if usable:
                clips = rf.to_clip_scores(rec, it.duration, rules)
                gt = gt_clip_scores(int(it.duration / 2), it.relevant_clip_ids, it.saliency_scores)
                score = (highlight_metrics({key: gt}, {key: clips})["VeryGood"]["mAP"] or 0) / 100
        else:
            truth = tuple(
                (float(s), float(e), c) for (s, e), c in zip(it.segments, it.captions, strict=True)
            )
            if usable:
                events = rf.to_dense_events(rec, rules)
                pred = tuple((float(e["timestamp"][0]), float(e["timestamp"][1])) for e in events)
                m = dense_metrics({key: it}, {key: events}, use_java=False)
                score = (m["F1"] or 0.0) / 100
        query = getattr(it, "query", None) or getattr(it, "question", None)
        out.append(Scored(key, it.video, query, float(score), rec, truth, pred, dur))
    return out


def _histogram(scores: Sequence[float], label: str, bins: int = 10) -> str:
    counts = [0] * bins
    for s in scores:
        counts[min(int(s * bins), bins - 1)] += 1
    top = max(counts) or 1
    bars = "".join(
        f'<rect class="bar" data-bin="{k}" data-count="{c}" x="{k * 10 + 1}" '
        f'y="{60 - 58 * c / top:.1f}" width="8" height="{58 * c / top:.1f}">'
        f"<title>{k / bins:.1f}–{(k + 1) / bins:.1f}: {c}</title></rect>"
        for k, c in enumerate(counts)
    )
    return (
        f'<figure class="hist"><svg viewBox="0 0 100 70" role="img" aria-label="{esc(label)} '
        f'histogram">{bars}<text x="0" y="69">0</text><text x="92" y="69">1</text></svg>'
        f"<figcaption>{esc(label)} per item ({len(scores)} items)</figcaption></figure>"
    )


def _mini(s: Scored) -> str:
    """Reference (green) and prediction (blue) spans on one small bar."""
    length = max([s.duration] + [max(a, b) for a, b, _ in s.truth] + [max(p) for p in s.pred])
    length = length or 1.0

    def rects(spans: Sequence[tuple[float, float]], cls: str, y: int) -> str:
        return "".join(
            f'<rect class="{cls}" x="{100 * min(a, b) / length:.2f}" y="{y}" height="8" '
            f'width="{max(100 * abs(b - a) / length, 0.8):.2f}"/>'
            for a, b in spans
        )

    truth = [(a, b) for a, b, _ in s.truth]
    return (
        '<svg class="mini" viewBox="0 0 100 20" preserveAspectRatio="none">'
        f'<rect class="axis" x="0" y="9" width="100" height="2"/>{rects(truth, "t", 0)}'
        f"{rects(s.pred, 'p', 11)}</svg>"
    )


def page_name(key: str) -> str:
    """A safe, unique file name for an item's page (keys are the benchmark's ids)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:60].lstrip(".") or "item"
    return f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.html"


def _rows(items: Sequence[Scored], task: str, linked: set[str]) -> str:
    rows = []
    for s in items:
        name = esc(s.key)
        if s.key in linked:
            name = f'<a href="items/{esc(page_name(s.key))}">{name}</a>'
        rows.append(
            f'<tr class="item" data-key="{esc(s.key)}" data-score="{s.score:.4f}">'
            f"<td>{name}</td><td>{esc(s.video)}</td><td>{esc(s.query or '')}</td>"
            f"<td>{s.score:.2f}</td><td>{_mini(s)}</td></tr>"
        )
    head = (
        f"<th>item</th><th>video</th><th>query</th><th>{esc(SCORE_NAMES[task])}</th>"
        "<th>reference / prediction</th>"
    )
    return f'<table class="items"><tr>{head}</tr>{"".join(rows)}</table>'


def _metrics_table(benchmark: str, task: str, metrics: Mapping[str, Any]) -> str:
    published = PUBLISHED.get((benchmark, task), {})
    names = headline(task, dict(metrics))

    rows = "".join(
        f'<tr class="metric" data-name="{esc(n)}"><th>{esc(n)}</th>'
        f"<td>{esc(fmt_metric(metrics.get(n)))}</td>"
        f"<td>{esc(fmt_metric(published.get(n)))}</td></tr>"
        for n in names
    )
    notes = [NOTES[task]]
    notes += [f"{k} unavailable: {v}" for k, v in (metrics.get("unavailable") or {}).items()]
    notes += [f"{k} approximate: {v}" for k, v in (metrics.get("approximate") or {}).items()]
    return (
        '<table class="metrics"><tr><th>metric</th><th>this run</th><th>TRACE release (paper)'
        f"</th></tr>{rows}</table>" + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    )


def _counts(metrics: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    facts = [
        ("model", settings.get("model")),
        ("backend", settings.get("backend") or settings.get("url") or "from the directory"),
        ("frames", settings.get("frames") or "the model's"),
        ("rules", metrics.get("rules")),
        ("annotated", metrics.get("queries")),
        ("with a prediction", metrics.get("predictions")),
        ("missing videos", metrics.get("missing_videos", 0)),
        ("failed requests", metrics.get("errors", 0)),
    ]
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    return f'<table class="request">{body}</table>'


def write_eval_report(
    out: str | os.PathLike,
    benchmark: str,
    task: str,
    items: Sequence[Any],
    records: Mapping[str, Any],
    metrics: Mapping[str, Any],
    settings: Mapping[str, Any],
    *,
    n: int = 5,
    pages: str = "best-worst",
    links: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write ``OUT/report.html`` (and the item pages under ``OUT/items/``); returns it.

    Args:
        n: how many best and worst items to show.
        pages: which items get a timeline page: ``best-worst``, ``all`` or ``none``.
        links: other reports to link from the page (e.g. the bench's markdown and PNG).
    """
    from trace_rt.timeline import write_report

    out = Path(out)
    rules = str(settings.get("rules", "original"))
    scored = score_items(task, items, records, rules, benchmark)
    predicted = [s for s in scored if s.record is not None]
    ranked = sorted(predicted, key=lambda s: (-s.score, s.key))
    best, worst = ranked[:n], sorted(scored, key=lambda s: (s.score, s.key))[:n]
    chosen = {"all": scored, "best-worst": best + worst, "none": []}[pages]
    linked: set[str] = set()
    for s in chosen:
        if s.record is None or s.key in linked or not Path(s.record.get("video", "")).is_file():
            continue
        rec = s.record
        write_report(
            out / "items" / page_name(s.key),
            {**rec, "task": task},
            video=rec["video"],
            request={"task": task, "query": s.query, "model": settings.get("model")},
            ground_truth=s.truth,
            gt_iou=s.score if task == "mr" else None,
            link_video=True,
            title=f"{benchmark} · {s.key} · {SCORE_NAMES[task]} {s.score:.2f}",
        )
        linked.add(s.key)
    rel_links = "".join(
        f'<li><a href="{esc(os.path.relpath(p, out))}">{esc(Path(p).name)}</a></li>' for p in links
    )
    title = f"trace-rt eval · {benchmark} ({task})"
    body = (
        f"<header><h1>{esc(title)}</h1>{_counts(metrics, settings)}</header><main>"
        f"<section><h2>Metrics</h2>{_metrics_table(benchmark, task, metrics)}</section>"
        f"<section><h2>Distribution</h2>{_histogram([s.score for s in scored], SCORE_NAMES[task])}"
        f"</section><section><h2>Best {len(best)}</h2>{_rows(best, task, linked)}</section>"
        f"<section><h2>Worst {len(worst)}</h2>{_rows(worst, task, linked)}</section>"
        + (f"<section><h2>Other reports</h2><ul>{rel_links}</ul></section>" if links else "")
        + "</main>"
    )
    page = out / "report.html"
    page.write_text(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{esc(title)}</title><style>{asset('timeline.css')}{asset('eval.css')}</style>"
        f"</head><body>{body}</body></html>\n",
        encoding="utf-8",
    )
    return page


__all__ = ["PAGES", "Scored", "page_name", "score_items", "write_eval_report"]
