"""Moment retrieval and highlight detection metrics, as the original computes them.

All figures are percentages (the original prints ``x * 100``), except mIoU, which the
original prints as a fraction and the paper as a percentage: here both are percentages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MR_THRESHOLDS = (0.3, 0.5, 0.7)
HL_LEVELS = {"Fair": 2, "Good": 3, "VeryGood": 4}  # minimum saliency of a positive clip

Span = Sequence[float]


def iou_original(gt: Span, pred: Span) -> float:
    """``eval_tvg.py``'s ``iou(A, B)``: endpoints taken as given, so a reversed span
    (end before start) has no intersection and scores 0. Where the original divides by
    zero (a zero-length ground truth predicted exactly), 0 is returned."""
    max0, min0 = max(gt[0], pred[0]), min(gt[0], pred[0])
    max1, min1 = max(gt[1], pred[1]), min(gt[1], pred[1])
    union = max1 - min0
    return max(min1 - max0, 0.0) / union if union > 0 else 0.0


def iou_sorted(gt: Span, pred: Span) -> float:
    """Temporal IoU with each span's endpoints sorted first (the ``lenient`` rules)."""
    a0, a1 = sorted(pred)
    b0, b1 = sorted(gt)
    union = max(a1, b1) - min(a0, b0)
    if union <= 0:  # two instants: a hit only if they coincide
        return 1.0 if a0 == b0 else 0.0
    return max(0.0, min(a1, b1) - max(a0, b0)) / union


def moment_metrics(
    gts: Mapping[str, Span],
    preds: Mapping[str, Span | None],
    *,
    sort_spans: bool = False,
    thresholds: Sequence[float] = MR_THRESHOLDS,
) -> dict[str, float | int | None]:
    """R@θ and mIoU the way ``eval_tvg.py`` computes them, plus the all-queries variant.

    Args:
        gts: query id -> ground-truth span.
        preds: query id -> predicted span, or None for a query whose output held no usable
            span (the original's empty entry, scored as ``[0, 0]``). Query ids absent from
            *preds* have no prediction at all (missing video, dropped result).
        sort_spans: use :func:`iou_sorted` instead of :func:`iou_original`.

    Returns:
        ``R@θ`` and ``mIoU`` divided by the number of parsed predictions (the original's
        ``num``: predictions that have a span; None when there is none, where the original
        divides by zero), and ``R@θ (all)`` / ``mIoU (all)`` divided by the number of
        ground-truth queries (every query without a span counts 0).
    """
    iou = iou_sorted if sort_spans else iou_original
    parsed = sum(1 for p in preds.values() if p is not None)
    hits = dict.fromkeys(thresholds, 0)
    total = 0.0
    for qid, gt in gts.items():
        if qid not in preds:
            continue
        pred = preds[qid]
        v = iou(gt, pred if pred is not None else (0.0, 0.0))
        for t in thresholds:
            hits[t] += v >= t
        total += v
    out: dict[str, float | int | None] = {}
    for t in thresholds:
        out[f"R@{t:g}"] = 100 * hits[t] / parsed if parsed else None
    out["mIoU"] = 100 * total / parsed if parsed else None
    n = len(gts)
    for t in thresholds:
        out[f"R@{t:g} (all)"] = 100 * hits[t] / n if n else 0.0
    out["mIoU (all)"] = 100 * total / n if n else 0.0
    out.update(queries=n, predictions=sum(q in preds for q in gts), parsed=parsed)
    return out


# ---- highlight detection (eval_vhd.py on QVHighlights) ------------------------------------


def precision_recall_curve(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, ...]:
    """scikit-learn's ``precision_recall_curve`` (binary, no sample weights): one point per
    distinct score, ordered by decreasing recall, then the (precision 1, recall 0) end."""
    order = np.argsort(y_score, kind="mergesort")[::-1]
    s, y = y_score[order], y_true[order]
    last = np.r_[np.where(np.diff(s))[0], y.size - 1]  # the last index of each score tie
    tps = np.cumsum(y)[last]
    fps = 1 + last - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def average_precision(y_true: Sequence[float], y_score: Sequence[float]) -> float:
    """``get_ap`` of the QVHighlights evaluation (interpolated, not 11-point): all-negative
    labels give 0, all-positive 1; otherwise the mean interpolated precision at each
    point where recall changes. Ties in *y_score* form one point."""
    yt = np.asarray(y_true, dtype=float)
    ys = np.asarray(y_score, dtype=float)
    if len(set(yt.tolist())) == 1:
        return 0.0 if yt[0] == 0 else 1.0
    precision, recall = precision_recall_curve(yt, ys)
    recall = recall.astype(np.float32)
    precision = np.maximum.accumulate(precision)
    return float(np.mean(precision[np.where(np.diff(recall))]))


def _fit(pred: Sequence[float], n: int) -> np.ndarray:
    """The prediction cut or zero-padded to *n* clips (``compute_ap_from_tuple``)."""
    out = np.zeros(n)
    p = np.asarray(pred, dtype=float)[:n]
    out[: p.size] = p
    return out


def gt_clip_scores(n_clips: int, clip_ids: Sequence[int], scores: Sequence[Sequence[float]]):
    """``mk_gt_scores``: a (clips, 3) array, annotated clips filled, the rest 0."""
    full = np.zeros((n_clips, 3))
    if len(clip_ids):
        full[np.asarray(clip_ids)] = np.asarray(scores, dtype=float)
    return full


def highlight_metrics(
    gts: Mapping[str, np.ndarray], preds: Mapping[str, Sequence[float]]
) -> dict[str, dict[str, Any]]:
    """mAP and HIT@1 at each saliency level (``eval_highlight``), over the queries in
    both *gts* (query id -> (clips, 3) saliency) and *preds* (query id -> clip scores).

    HIT@1: the top-scored clip (the first on ties, ``np.argmax``) is a hit if any of the
    three annotators rates it at or above the level; a prediction with no clips hits
    nothing. mAP: :func:`average_precision` per query and annotator, averaged.
    """
    qids = [q for q in preds if q in gts]
    out: dict[str, dict[str, float]] = {}
    for name, level in HL_LEVELS.items():
        hits, aps = [], []
        for q in qids:
            binary = (gts[q] >= level).astype(float)  # (clips, 3)
            pred = list(preds[q])
            top = int(np.argmax(pred)) if pred else -1
            hits.append(float(binary[top].max()) if 0 <= top < len(binary) else 0.0)
            fitted = _fit(pred, len(binary))
            aps.extend(average_precision(binary[:, w], fitted) for w in range(3))
        out[name] = {  # None: no query to average over
            "mAP": 100 * float(np.mean(aps)) if aps else None,
            "HIT@1": 100 * float(np.mean(hits)) if hits else None,
            "queries": len(qids),
        }
    return out
