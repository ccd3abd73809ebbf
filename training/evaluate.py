"""``python -m training eval``: moment retrieval on a split, through the serving pipeline.

A thin use of :mod:`trace_rt.evaluation` (the code behind ``trace-rt eval``): each ``mr``
sample of the split goes through :class:`trace_rt.pipeline.Pipeline` (any backend) exactly
as ``trace-rt run`` would answer it, the generation becomes a span by the original's
reformat rules (or ``rules="lenient"``, :mod:`trace_rt.evaluation.reformat`) and is scored
by :func:`trace_rt.evaluation.metrics.moment_metrics` (R@θ and mIoU in percent, over parsed
predictions as the original divides, and over all queries). The baseline predicts the
whole video. The frame oracles answer with the ground truth snapped onto the sampled
frames (``nearest``: the release's training targets; ``cover``: the bracketing frames):
the best a model trained on those targets can score with these frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.evaluation import reformat as rf
from trace_rt.evaluation.metrics import moment_metrics
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
    samples = [s for s in load_split(split) if s.task == "mr"]
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise ValueError(f"{split}: no moment-retrieval samples")
    if pipeline is None:
        backend = backend or infer_backend(model_dir)
        opts = {"device": device} if device else {}
        pipe = Pipeline.from_dir(model_dir, backend, template=template, **opts)
    else:
        pipe, backend, template = pipeline, pipeline.backend.name, pipeline.template
    gen = GenerationConfig(max_new_tokens=max_new_tokens, constrained=constrained)
    tok, ids = pipe.tokenizer, pipe.config.ids
    gts: dict[str, tuple[float, float]] = {}
    preds: dict[str, Any] = {}
    base: dict[str, Any] = {}
    oracle: dict[str, dict[str, Any]] = {"nearest": {}, "cover": {}}
    rows = []
    for s in samples:
        res = pipe.run(s.video, "mr", query=s.query, gen=gen)
        rec = {
            "release": rf.release_output(res["token_ids"], tok, ids).to_dict(),
            "events": rf.lenient_events(res["token_ids"], tok, ids),
        }
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
