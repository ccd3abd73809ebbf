"""Moment-retrieval metrics: temporal IoU, recall at IoU thresholds, mean IoU.

The standard definitions (Charades-STA, as the release's ``eval_tvg.py`` computes them):
per query, IoU of the predicted span and the ground-truth span (intersection over union of
the two intervals); R@θ = share of queries with IoU ≥ θ; mIoU = mean IoU. A query without a
usable prediction (nothing parseable, fewer than two timestamps) counts as IoU 0: it is
never dropped from the denominator.
"""

from __future__ import annotations

from collections.abc import Sequence

THRESHOLDS = (0.3, 0.5, 0.7)
Span = tuple[float, float]


def iou(pred: Span | None, gt: Span) -> float:
    """Temporal IoU of two [start, end] spans (endpoints in any order); None -> 0."""
    if pred is None:
        return 0.0
    a0, a1 = sorted(pred)
    b0, b1 = sorted(gt)
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = max(a1, b1) - min(a0, b0)
    if union <= 0:  # two identical instants: a hit only if they coincide
        return 1.0 if a0 == b0 else 0.0
    return inter / union


def grounding_metrics(
    preds: Sequence[Span | None], gts: Sequence[Span], thresholds: Sequence[float] = THRESHOLDS
) -> dict[str, float]:
    """``{"R@0.3": .., "R@0.5": .., "R@0.7": .., "mIoU": .., "n": .., "unparsed": ..}``."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground truths")
    if not gts:
        raise ValueError("no queries to score")
    ious = [iou(p, g) for p, g in zip(preds, gts, strict=True)]
    out = {f"R@{t:g}": sum(v >= t for v in ious) / len(ious) for t in thresholds}
    out["mIoU"] = sum(ious) / len(ious)
    out["n"] = len(ious)
    out["unparsed"] = sum(p is None for p in preds)
    return out
