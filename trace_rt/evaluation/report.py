"""``metrics.json`` and ``metrics.md``: the figures beside the release's published ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trace_rt.evaluation.benchmarks import PUBLISHED

HEADLINE = {
    "mr": ("R@0.3", "R@0.5", "R@0.7", "mIoU"),
    "vhd": ("mAP", "HIT@1"),
    "dvc": ("CIDEr", "METEOR", "SODA_c", "F1"),
    "qa": ("accuracy",),
}
NOTES = {
    "mr": "R@θ and mIoU divide by the queries with a parsed span, as the original's "
    "`eval_tvg.py` does; `(all)` divides by every annotated query.",
    "vhd": "QVHighlights `VeryGood` level (saliency >= 4), as the original reports it; "
    "the other levels are in metrics.json.",
    "dvc": "Per-video scores averaged over the videos with a prediction (the original's "
    "`eval_dvc.py`); F1 from each video's mean precision and recall.",
    "qa": "Accuracy (%) over the questions with a prediction, matched by the original's "
    "option-letter rules (MVBench `check_ans`, Video-MME's first letter); the published "
    "number is trace-uni's.",
}


def headline(task: str, metrics: dict[str, Any]) -> list[str]:
    """The metric names a report shows for *task* (video QA adds one per task/facet)."""
    names = list(HEADLINE[task])
    if task == "mr":
        names += [f"{n} (all)" for n in HEADLINE[task]]
    if task == "qa":
        names += [k for k in metrics if k.startswith("accuracy · ")]
    return names


def fmt_metric(v: Any) -> str:
    """A metric as the reports print it: one decimal, ``n/a`` for None."""
    return "n/a" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def markdown(benchmark: str, task: str, metrics: dict[str, Any]) -> str:
    """A table of the headline metrics beside the release's published numbers."""
    published = PUBLISHED.get((benchmark, task), {})
    names = headline(task, metrics)
    lines = [
        f"# {benchmark} ({task})",
        "",
        "| metric | this run | TRACE release (paper) |",
        "|---|---|---|",
    ]
    for n in names:
        lines.append(f"| {n} | {fmt_metric(metrics.get(n))} | {fmt_metric(published.get(n))} |")
    lines += ["", NOTES[task], ""]
    lines.append(
        f"Queries/videos annotated: {metrics.get('queries')}; with a prediction: "
        f"{metrics.get('predictions')}; missing videos: {metrics.get('missing_videos', 0)} "
        f"({metrics.get('items_without_video', 0)} items); "
        f"failed requests: {metrics.get('errors', 0)}; reformat rules: {metrics.get('rules')}."
    )
    for name, why in (metrics.get("unavailable") or {}).items():
        lines.append(f"- {name} unavailable: {why}")
    for name, why in (metrics.get("approximate") or {}).items():
        lines.append(f"- {name} approximate: {why}")
    if not published:
        lines.append("- No published number for this benchmark/task pair.")
    return "\n".join(lines) + "\n"


def write_report(
    out: str | Path, benchmark: str, task: str, metrics: dict[str, Any], settings: dict
) -> None:
    """Write ``metrics.json`` (metrics, published numbers, settings) and ``metrics.md``."""
    out = Path(out)
    doc = {
        "benchmark": benchmark,
        "task": task,
        "metrics": metrics,
        "published": PUBLISHED.get((benchmark, task)),
        "settings": settings,
    }
    (out / "metrics.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "metrics.md").write_text(markdown(benchmark, task, metrics))
