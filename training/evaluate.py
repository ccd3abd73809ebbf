"""``python -m training eval``: moment retrieval (or dense captions) on a split, through
the serving pipeline.

A thin use of :mod:`trace_rt.evaluation` (the code behind ``trace-rt eval``): each ``mr``
sample of the split goes through :class:`trace_rt.pipeline.Pipeline` (any backend) exactly
as ``trace-rt run`` would answer it, the generation becomes a span by the original's
reformat rules (or ``rules="lenient"``, :mod:`trace_rt.evaluation.reformat`) and is scored
by :func:`trace_rt.evaluation.metrics.moment_metrics` (R@θ and mIoU in percent, over parsed
predictions as the original divides, and over all queries). The baseline predicts the
whole video. The frame oracles answer with the ground truth snapped onto the sampled
frames (``nearest``: the release's training targets; ``cover``: the bracketing frames):
the best a model trained on those targets can score with these frames.

Dense captions (:func:`evaluate_dvc`) are read event by event: each ground-truth event is
paired with the predicted event that overlaps it most, and scored on where it is (IoU)
and what it says (the share of the true caption's words the paired caption holds, and
exact captions): enough to tell whether a model names the right shape at the right time,
which the release's caption metrics (``trace-rt eval``) blur into one n-gram figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.evaluation import reformat as rf
from trace_rt.evaluation.metrics import iou_original, moment_metrics
from trace_rt.evaluation.runner import infer_backend
from trace_rt.generate import GenerationConfig
from trace_rt.pipeline import Pipeline
from training.data import load_split
from training.dataset import snap_span


def evaluate_mr(
    model_dir: str | Path,
    split: str | Path,
    *,
    backend: str | None = None,
    constrained: bool = False,
    max_new_tokens: int = 32,
    limit: int | None = None,
    device: str | None = None,
    rules: str = "original",
    template: str = "llama_2",
    pipeline: Pipeline | None = None,
) -> dict[str, Any]:
    """Metrics of the model and of the whole-video baseline, plus per-query predictions.

    Args:
        backend: default: inferred from *model_dir* (artifact -> onnxruntime, checkpoint
            -> torch).
        template: the prompt's chat template (``llama_2``: the release's evaluation).
        pipeline: answer with this pipeline instead of loading *model_dir* (*backend*,
            *device* and *template* then come from it).
    """
    samples = _samples(split, "mr", limit)
    pipe = pipeline or _pipeline(model_dir, backend, device, template)
    backend, template = pipe.backend.name, pipe.template
    gen = GenerationConfig(max_new_tokens=max_new_tokens, constrained=constrained)
    gts: dict[str, tuple[float, float]] = {}
    preds: dict[str, Any] = {}
    base: dict[str, Any] = {}
    oracle: dict[str, dict[str, Any]] = {"nearest": {}, "cover": {}}
    rows = []
    for s in samples:
        res = pipe.run(s.video, "mr", query=s.query, gen=gen)
        rec = _record(res["token_ids"], pipe)
        gt = (s.events[0].timestamps[0], s.events[0].timestamps[1])
        gts[s.id] = gt
        span = None if rf.is_dropped(rec, rules) else rf.to_moment(rec, rules)
        if not rf.is_dropped(rec, rules):
            preds[s.id] = span
        base[s.id] = (0.0, float(res["duration"]))
        times = np.asarray(res["frame_times"])
        for mode, spans in oracle.items():
            spans[s.id] = tuple(snap_span(gt, times, mode))
        rows.append({"id": s.id, "query": s.query, "gt": list(gt), "pred": span})
    lenient = rules == "lenient"
    return {
        "model": str(model_dir),
        "backend": backend,
        "constrained": constrained,
        "rules": rules,
        "template": template,
        "prompts": pipe.prompts.source,
        "model_metrics": moment_metrics(gts, preds, sort_spans=lenient),
        "whole_video_baseline": moment_metrics(gts, base, sort_spans=lenient),
        **{
            f"frame_oracle_{m}": moment_metrics(gts, v, sort_spans=lenient)
            for m, v in oracle.items()
        },
        "predictions": rows,
    }


def _samples(split: str | Path, task: str, limit: int | None) -> list:
    samples = [s for s in load_split(split) if s.task == task]
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise ValueError(f"{split}: no {task!r} samples")
    return samples


def _pipeline(model_dir: str | Path, backend: str | None, device: str | None,
              template: str) -> Pipeline:  # fmt: skip
    opts = {"device": device} if device else {}
    return Pipeline.from_dir(model_dir, backend or infer_backend(model_dir), template=template,
                             **opts)  # fmt: skip


def _record(token_ids: Sequence[int], pipe: Pipeline) -> dict[str, Any]:
    """A generation as predictions.jsonl keeps it: the original's reading and ours."""
    tok, ids = pipe.tokenizer, pipe.config.ids
    return {
        "release": rf.release_output(token_ids, tok, ids).to_dict(),
        "events": rf.lenient_events(token_ids, tok, ids),
    }


def _words(caption: str) -> set[str]:
    return set(caption.lower().replace(".", " ").replace(",", " ").split())


def pair_events(
    true: Sequence[tuple[tuple[float, float], str]], pred: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each true event ``(span, caption)`` with the predicted event (``{"timestamp": [s,
    e], "caption": str}``) of highest IoU; ``pred_caption`` None where none overlaps.
    ``words``: the share of the true caption's words in the paired caption."""
    out = []
    for span, caption in true:
        scored = [(iou_original(span, tuple(p["timestamp"])), p) for p in pred]
        iou, best = max(scored, key=lambda x: x[0], default=(0.0, None))
        cap = best["caption"] if best is not None and iou > 0 else None
        want = _words(caption)
        share = len(want & _words(cap)) / len(want) if cap is not None and want else 0.0
        out.append({"gt": list(span), "caption": caption, "iou": round(iou, 4),
                    "pred_caption": cap, "words": share,
                    "exact": cap is not None and _words(cap) == want})  # fmt: skip
    return out


def dense_metrics(pairs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Percent over the true events of :func:`pair_events`: located (IoU >= 0.5), mean
    share of caption words, exact captions."""
    n = len(pairs)
    if not n:
        raise ValueError("no true events to score")
    return {
        "events": n,
        "located@0.5": 100.0 * sum(p["iou"] >= 0.5 for p in pairs) / n,
        "caption_words": 100.0 * sum(p["words"] for p in pairs) / n,
        "exact_captions": 100.0 * sum(p["exact"] for p in pairs) / n,
    }


def evaluate_dvc(
    model_dir: str | Path,
    split: str | Path,
    *,
    backend: str | None = None,
    max_new_tokens: int = 96,
    limit: int | None = None,
    device: str | None = None,
    rules: str = "original",
    template: str = "llama_2",
    pipeline: Pipeline | None = None,
) -> dict[str, Any]:
    """Dense captions of the split's ``dvc`` samples, read event by event (module doc):
    :func:`dense_metrics` of :func:`pair_events` over every true event, and the mean
    number of events predicted and true per video. Arguments as :func:`evaluate_mr`.
    """
    samples = _samples(split, "dvc", limit)
    pipe = pipeline or _pipeline(model_dir, backend, device, template)
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    rows, pairs, n_pred = [], [], 0
    for s in samples:
        rec = _record(pipe.run(s.video, "dvc", gen=gen)["token_ids"], pipe)
        pred = [] if rf.is_dropped(rec, rules) else rf.to_dense_events(rec, rules)
        true = [((e.timestamps[0], e.timestamps[1]), e.caption) for e in s.events]
        paired = pair_events(true, pred)
        n_pred += len(pred)
        pairs += paired
        rows.append({"id": s.id, "pred": pred, "events": paired})
    return {
        "model": str(model_dir),
        "backend": pipe.backend.name,
        "rules": rules,
        "template": pipe.template,
        "model_metrics": {
            **dense_metrics(pairs),
            "videos": len(samples),
            "events_per_video": n_pred / len(samples),
            "true_events_per_video": len(pairs) / len(samples),
        },
        "predictions": rows,
    }
