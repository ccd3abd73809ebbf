"""Dense video captioning metrics, as the original's ``trace/metrics/dvc/eval_dvc.py``.

That script (from VTG-LLM, after Vid2Seq's evaluation) scores each video on its own and
averages over videos; it scores only videos that have a prediction entry. Per video:

* localisation: for tIoU θ in {0.3, 0.5, 0.7, 0.9}, a prediction is a hit if its tIoU
  with some ground truth is *greater than* θ (strictly), a ground truth is covered
  likewise; precision = hits / predictions, recall = covered / ground truths, each
  the best over annotation sets ("splits"); F1 from the mean precision and mean recall
  over θ (per video, then averaged -- not the F1 of the averages);
* tIoU is ``eval_dvc.py``'s ``iou``: endpoints sorted, union ``min(hull, len1 + len2)``
  plus 1e-8;
* captions: for each θ, every prediction is paired with every ground truth at tIoU
  *at least* θ, or, if none, with a random lower-case string (which matches nothing);
  CIDEr-D and METEOR are computed over *this video's pairs only* (so CIDEr's document
  frequencies come from that video's references) and averaged over θ;
* SODA_c (``sodac``): METEOR of every (ground truth, prediction) pair -- computed with
  the ground truth as hypothesis and the prediction as reference, as the original
  passes them -- times their tIoU, the best order-preserving matching by dynamic
  programming, F-measure of (score / #predictions, score / #ground truths); per split.

Figures are percentages (the original prints ``x * 100``).
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trace_rt.evaluation.annotations import CaptionedVideo
from trace_rt.evaluation.captions import JavaScorers, PythonTokenizer, cider_d, java_status

DVC_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def dvc_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """``eval_dvc.py``'s interval IoU (see the module docstring)."""
    s1, e1 = float(min(a)), float(max(a))
    s2, e2 = float(min(b)), float(max(b))
    inter = max(0.0, min(e1, e2) - max(s1, s2))
    union = min(max(e1, e2) - min(s1, s2), e1 - s1 + e2 - s2)
    return inter / (union + 1e-8)


def best_matching_score(scores: np.ndarray) -> float:
    """SODA's ``chased_dp_assignment`` value: the largest sum of ``scores[i, j]`` over
    pairs that are increasing in both i and j (each row and column used at most once)."""
    m, n = scores.shape
    dp = np.zeros((m + 1, n + 1))
    for i in range(m):
        for j in range(n):
            dp[i + 1, j + 1] = max(dp[i, j + 1], dp[i + 1, j], dp[i, j] + scores[i, j])
    return float(dp[m, n])


def detection_scores(
    pred: Sequence[Sequence[float]], gt: CaptionedVideo, thresholds: Sequence[float]
) -> tuple[list[float], list[float]]:
    """Per-θ precision and recall of one video (best over its splits)."""
    best_p = [0.0] * len(thresholds)
    best_r = [0.0] * len(thresholds)
    for split in sorted(set(gt.splits)):
        segs = [s for s, sp in zip(gt.segments, gt.splits, strict=True) if sp == split]
        for k, t in enumerate(thresholds):
            hit_p, hit_g = set(), set()
            for g, gs in enumerate(segs):
                for p, ps in enumerate(pred):
                    if dvc_iou(ps, gs) > t:
                        hit_p.add(p)
                        hit_g.add(g)
            best_p[k] = max(best_p[k], len(hit_p) / max(len(pred), 1))
            best_r[k] = max(best_r[k], len(hit_g) / len(segs))
    return best_p, best_r


class _Scorer:
    """Tokenizer plus the caption metrics available here."""

    def __init__(self, use_java: bool | None) -> None:
        ok, why = java_status()
        if use_java is False:
            ok, why = False, "Java scorers disabled (--no-java)"
        self.java: JavaScorers | None = None
        self.reason = why
        if ok:
            self.java = JavaScorers()
        self.tok = self.java or PythonTokenizer()


def dense_metrics(
    gts: Mapping[str, CaptionedVideo],
    preds: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    thresholds: Sequence[float] = DVC_THRESHOLDS,
    use_java: bool | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """CIDEr, METEOR, SODA_c, precision/recall/F1 over the videos in both *gts* and
    *preds* (video -> ``[{"timestamp": [s, e], "caption": str}]``)."""
    keys = [k for k in gts if k in preds]
    sc = _Scorer(use_java)
    rng = random.Random(seed)  # the original draws its no-match strings unseeded
    try:
        per_video = [_score_video(gts[k], preds[k], thresholds, sc, rng) for k in keys]
    finally:
        if sc.java is not None:
            sc.java.close()
    out: dict[str, Any] = {"videos": len(keys)}
    names = ["CIDEr", "METEOR", "SODA_c", "F1", "Precision", "Recall"]
    names += [f"{m}@{t:g}" for t in thresholds for m in ("Precision", "Recall")]
    for name in names:  # None: no video to average over
        vals = [v[name] for v in per_video if v.get(name) is not None]
        out[name] = 100 * float(np.mean(vals)) if vals else None
    out["tokenizer"] = "PTBTokenizer (Java)" if sc.java else "Python approximation of PTB"
    if sc.java is None:
        out["METEOR"] = out["SODA_c"] = None
        out["unavailable"] = {"METEOR": sc.reason, "SODA_c": sc.reason}
        out["approximate"] = {"CIDEr": f"captions tokenized in Python ({sc.reason})"}
    out["predicted_events_per_video"] = (
        float(np.mean([v["n_preds"] for v in per_video])) if per_video else 0.0
    )
    return out


def _score_video(
    gt: CaptionedVideo,
    pred: Sequence[Mapping[str, Any]],
    thresholds: Sequence[float],
    sc: _Scorer,
    rng: random.Random,
) -> dict[str, Any]:
    segs = [tuple(p["timestamp"]) for p in pred]
    caps_raw = [str(p["caption"]) for p in pred]
    toks = sc.tok.tokenize([*caps_raw, *gt.captions])
    pcaps, gcaps = toks[: len(caps_raw)], toks[len(caps_raw) :]
    prec, rec = detection_scores(segs, gt, thresholds)
    mp, mr = sum(prec) / len(prec), sum(rec) / len(rec)
    res: dict[str, Any] = {
        "Precision": mp,
        "Recall": mr,
        "F1": 2 * mp * mr / (mp + mr) if mp + mr > 0 else 0.0,
        "n_preds": len(segs),
    }
    for k, t in enumerate(thresholds):
        res[f"Precision@{t:g}"], res[f"Recall@{t:g}"] = prec[k], rec[k]
    cider, meteor = [], []
    for t in thresholds:
        refs: dict[str, list[str]] = {}
        hyps: dict[str, str] = {}
        for p, ps in enumerate(segs):
            matched = [g for g, gs in enumerate(gt.segments) if dvc_iou(ps, gs) >= t]
            for g in matched:
                key = str(len(hyps))
                refs[key], hyps[key] = [gcaps[g]], pcaps[p]
            if not matched:
                key = str(len(hyps))
                noise = "".join(
                    rng.choice(string.ascii_lowercase) for _ in range(rng.randint(10, 20))
                )
                refs[key], hyps[key] = [noise], pcaps[p]
        if not hyps:
            cider.append(0.0)
            meteor.append(0.0)
            continue
        cider.append(cider_d(refs, hyps)[0])
        if sc.java is not None:
            meteor.append(sc.java.meteor(refs, hyps)[0])
    res["CIDEr"] = float(np.mean(cider))
    res["METEOR"] = float(np.mean(meteor)) if sc.java is not None else None
    res["SODA_c"] = _soda(gt, segs, pcaps, gcaps, sc) if sc.java is not None else None
    return res


def _soda(
    gt: CaptionedVideo,
    segs: Sequence[Sequence[float]],
    pcaps: Sequence[str],
    gcaps: Sequence[str],
    sc: _Scorer,
) -> float:
    """SODA_c of one video, averaged over its splits (``sodac`` with tIoU threshold 0)."""
    if not segs:
        return 0.0
    assert sc.java is not None
    fs = []
    for split in sorted(set(gt.splits)):
        idx = [i for i, sp in enumerate(gt.splits) if sp == split]
        iou = np.array([[dvc_iou(ps, gt.segments[g]) for ps in segs] for g in idx])
        meteor = np.zeros_like(iou)
        for r, g in enumerate(idx):
            refs = {str(p): [c] for p, c in enumerate(pcaps)}
            hyps = {str(p): gcaps[g] for p in range(len(pcaps))}
            per = sc.java.meteor(refs, hyps)[1]
            meteor[r] = [per[str(p)] for p in range(len(pcaps))]
        best = best_matching_score(iou * np.nan_to_num(meteor))
        n_g, n_p = iou.shape
        p, r = best / n_p, best / n_g
        fs.append(2 * p * r / (p + r) if p + r > 0 else 0.0)
    return float(np.mean(fs))
