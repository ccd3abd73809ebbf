"""``python -m training eval``: moment retrieval on a split, through the serving pipeline.

Each ``mr`` sample of the split goes through :class:`trace_rt.pipeline.Pipeline` (any
backend: a checkpoint with ``torch``, an exported artifact with ``onnxruntime``) exactly as
``trace-rt run`` would answer it; the first event's two timestamps are the prediction
(:func:`trace_rt.events.first_span`). The baseline predicts the whole video. The frame
oracles answer with the ground truth snapped onto the sampled frames (``nearest``: the
release's training targets; ``cover``: the bracketing frames): the best a model trained on
those targets can score with these frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trace_rt.events import first_span, parse_events
from trace_rt.generate import GenerationConfig
from trace_rt.pipeline import Pipeline
from training.data import load_split
from training.dataset import snap_span
from training.metrics import grounding_metrics


def evaluate_mr(
    model_dir: str | Path,
    split: str | Path,
    *,
    backend: str = "onnxruntime",
    constrained: bool = False,
    max_new_tokens: int = 32,
    limit: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Metrics of the model and of the whole-video baseline, plus per-query predictions."""
    samples = [s for s in load_split(split) if s.task == "mr"]
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise ValueError(f"{split}: no moment-retrieval samples")
    opts = {"device": device} if device else {}
    pipe = Pipeline.from_dir(model_dir, backend, **opts)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, constrained=constrained)
    preds, base, gts, rows = [], [], [], []
    oracle: dict[str, list] = {"nearest": [], "cover": []}
    for s in samples:
        res = pipe.run(s.video, "mr", query=s.query, gen=gen)
        span = first_span(parse_events(res["token_ids"], pipe.tokenizer, pipe.config.ids))
        gt = tuple(s.events[0].timestamps[:2])
        preds.append(span)
        base.append((0.0, float(res["duration"])))
        gts.append(gt)
        times = np.asarray(res["frame_times"])
        for mode, spans in oracle.items():
            spans.append(tuple(snap_span(gt, times, mode)))
        rows.append({"id": s.id, "query": s.query, "gt": list(gt), "pred": span and list(span)})
    return {
        "model": str(model_dir),
        "backend": backend,
        "constrained": constrained,
        "model_metrics": grounding_metrics(preds, gts),
        "whole_video_baseline": grounding_metrics(base, gts),
        **{f"frame_oracle_{m}": grounding_metrics(v, gts) for m, v in oracle.items()},
        "predictions": rows,
    }
